"""Validation evaluates the quantizer in its inference form: the VQBridge maps the codebook once, not per batch."""

import torch
from tiny_runs import TINY_TOKENIZER

from fvq.data.images import batch_images
from fvq.distributed import DistributedContext
from fvq.quantizers import CodebookUsage
from fvq.training.config import load_config
from fvq.training.engine import Engine
from fvq.training.tokenizer_task import TokenizerTask, describe_validation

OVERRIDES = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=8",
    "data.val_samples=20",
    "global_batch_size=8",
    "val_batch_size=8",  # three batches, the last one short
    "tensorboard=false",
]


def test_validation_maps_the_codebook_once_and_counts_as_the_training_forward(tmp_path):
    config = load_config("tiny_fvq", OVERRIDES)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = Engine(config, tmp_path, ctx)
    task = TokenizerTask(engine)
    engine.attach(task)
    model = task.tokenizer
    with torch.no_grad():  # a bridge that maps codes apart, as after training (its expansion starts near zero)
        for p in model.quantizer.projector.parameters():
            p.add_(0.3 * torch.randn_like(p))
    calls = []
    hook = model.quantizer.projector.register_forward_hook(lambda *_: calls.append(1))
    metrics = task.validate(engine, step=0)
    hook.remove()
    assert len(calls) == 1  # three batches of held-out crops, one pass of the bridge
    assert model.training  # the mode it had before

    # the same histogram as the training model's own forward in eval mode, batch by batch
    model.eval()
    usage = CodebookUsage(64)
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=8)
    with torch.no_grad():
        for batch in loader:
            usage.update(model.quantizer(model.encode_latents(batch_images(batch))).indices)
    report = usage.compute()
    assert metrics["val/tokens"] == report.num_tokens == 20 * 4 * 4
    assert metrics["val/usage"] == report.usage and metrics["val/perplexity"] == report.perplexity
    assert report.usage > 2 / 64  # a histogram worth comparing, not one code


def test_validation_line_names_distinct_codes_only_when_the_quantizer_has_one_codebook():
    metrics = {"val/usage": 0.5, "val/perplexity": 12.0, "val/psnr": 20.0}
    assert describe_validation(metrics) == "held-out usage 50.00%, perplexity 12.0, PSNR 20.00 dB"
    line = describe_validation({**metrics, "val/distinct_codes": 4096.0})
    assert line == "held-out usage 50.00% (4096 distinct codes), perplexity 12.0, PSNR 20.00 dB"
