"""A training step reads nothing on the host: the skip decision is made on the device, losses, metrics and skip
counts wait for the log step."""

import torch
from tiny_runs import TINY_TOKENIZER

from fvq.distributed import DistributedContext
from fvq.training.config import load_config
from fvq.training.engine import Engine
from fvq.training.host_syncs import count_host_syncs
from fvq.training.tokenizer_task import TokenizerTask


def test_counter_sees_the_reads_it_names():
    x = torch.ones(3)
    with count_host_syncs() as counts:
        float(x.sum())
        x.tolist()
        bool(x.any())
        x.sum().item()
    assert counts == {"__float__": 1, "tolist": 1, "__bool__": 1, "item": 1}
    float(x.sum())  # outside the block: not counted, the methods are restored
    assert sum(counts.values()) == 4


def test_a_training_step_with_a_discriminator_reads_nothing_on_the_host():
    config = load_config(
        "tiny_fvq",
        [
            *TINY_TOKENIZER,
            "data.samples_per_epoch=16",
            "data.val_samples=8",
            "global_batch_size=4",
            "grad_accum_steps=2",
            "tensorboard=false",
            "loss.adversarial_weight=0.5",
            "loss.adversarial_start=0",
            "loss.discriminator.base_channels=8",
            "loss.discriminator.num_layers=2",
        ],
    )
    # FSQ: no nearest-code search, whose exact-tie handling reads values of its own (a duplicate-norm check per
    # call, and on CPU the fused kernel's finiteness check); the engine and the tokenizer task read nothing
    config.quantizer = {"type": "fsq", "levels": [4, 4, 4], "codebook_dim": 16}
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = Engine(config, "unused", ctx)
    engine.attach(TokenizerTask(engine))
    data = engine.micro_batches()
    engine.train_step(next(data), 0)  # first step: lazy initialisations may read values
    batch = next(data)  # data loading happens on the host, outside the count
    with count_host_syncs() as counts:
        applied, scalars = engine.train_step(batch, 1)
    assert not counts, dict(counts)  # two updates, both applied under their flags on the device
    assert applied and "discriminator/grad_norm" in scalars


def test_counter_sees_a_read_torch_makes_itself():
    # a 0-d tensor where an operator takes a scalar: torch reads it in C++ (the GPU waits), no Python method is called
    a, b = [torch.zeros(3)], [torch.ones(3)]
    with count_host_syncs() as counts:
        torch._foreach_lerp_(a, b, torch.tensor(0.5))
        torch._foreach_mul_(a, torch.tensor(2.0))  # a tensor overload: nothing read
    assert counts == {"_local_scalar_dense": 1}
