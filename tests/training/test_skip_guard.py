"""The non-finite-step guard decides on the device: a skipped step changes no weight and no optimizer state, and the
skip counts read at the sync points are exact."""

import pytest
import torch
from tiny_runs import TINY_TOKENIZER

from fvq.training.config import load_config
from fvq.training.engine import NonFiniteLossError, guarded_step, run_training
from fvq.training.host_syncs import count_host_syncs
from fvq.training.logging import read_log
from fvq.training.tokenizer_task import TokenizerTask

TINY = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=16",
    "data.val_samples=8",
    "global_batch_size=4",
    "tensorboard=false",
    "device=cpu",
    "val_every=0",
    "checkpoint_every=0",
]
GAN = [
    "loss.adversarial_weight=0.5",
    "loss.adversarial_start=0",
    "loss.discriminator.base_channels=8",
    "loss.discriminator.num_layers=2",
]


def poisoned(bad_steps: set[int], which: str = "generator_loss"):
    """A task builder whose loss ``which`` is NaN at ``bad_steps``."""

    def build(engine):
        task = TokenizerTask(engine)
        original = getattr(task.loss, which)

        def loss(*args, **kwargs):
            out = original(*args, **kwargs)
            step = args[3] if which == "generator_loss" else args[2]
            if step in bad_steps:
                out.loss = out.loss * float("nan")
            return out

        setattr(task.loss, which, loss)
        return task

    return build


def snapshot(task) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in task.tokenizer.state_dict().values()]
    for optimizer, _ in task.optimizers.values():
        for state in optimizer.state.values():
            tensors += [v.detach().clone() for v in state.values()]
    return tensors


def test_fused_optimizer_skips_on_the_device():
    w = torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.Adam([w], lr=0.1, fused=True)
    w.grad = torch.ones(4)
    guarded_step(adam, torch.tensor(True))
    after_one = (w.detach().clone(), *(v.clone() for v in adam.state[w].values()))
    w.grad = torch.full((4,), 3.0)
    guarded_step(adam, torch.tensor(False))  # parameters, moments and the step count stay
    assert all(torch.equal(a, b) for a, b in zip(after_one, (w.detach(), *adam.state[w].values())))
    assert float(adam.state[w]["step"]) == 1.0 and not hasattr(adam, "found_inf")
    with pytest.raises(TypeError, match="fused"):
        guarded_step(torch.optim.Adam([w], lr=0.1), torch.tensor(True))


def test_a_skipped_step_changes_nothing_and_the_logged_count_is_exact(tmp_path):
    seen = {}

    def build(engine):
        task = poisoned({2, 4})(engine)
        original = engine.train_step

        def train_step(batch, step):  # the weights and optimizer states around each step
            before = snapshot(task)
            applied, scalars = original(batch, step)
            seen[step] = (bool(applied), all(torch.equal(a, b) for a, b in zip(before, snapshot(task))))
            return applied, scalars

        engine.train_step = train_step
        return task

    config = load_config("tiny_fvq", [*TINY, *GAN, "max_steps=6", "log_every=3"])
    result = run_training(config, tmp_path, build)
    assert seen == {0: (True, False), 1: (True, False), 2: (False, True), 3: (True, False), 4: (False, True),
                    5: (True, False)}  # fmt: skip
    assert result.skipped_steps == 2
    log = read_log(tmp_path / "log.jsonl")
    counts = [
        (r["step"], r["train/skipped_nonfinite"], r["train/last_skipped_step"])
        for r in log
        if "train/skipped_nonfinite" in r
    ]
    assert counts == [(3, 1.0, 2), (6, 2.0, 4)]  # read at the sync points (log steps 3 and 6), exact
    assert [r["step"] for r in log if "train/loss" in r] == [1, 6]  # log step 3 ended the skipped step 2


def test_a_nonfinite_discriminator_update_is_skipped_alone(tmp_path):
    seen = {}

    def build(engine):
        task = poisoned({1}, "discriminator_loss")(engine)
        original = engine.train_step

        def train_step(batch, step):
            disc = [p.detach().clone() for p in task.loss.discriminator.parameters()]
            gen = [p.detach().clone() for p in task.tokenizer.parameters()]
            applied, scalars = original(batch, step)
            same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
            seen[step] = (
                bool(applied),
                same(gen, task.tokenizer.parameters()),
                same(disc, task.loss.discriminator.parameters()),
            )
            return applied, scalars

        engine.train_step = train_step
        return task

    config = load_config("tiny_fvq", [*TINY, *GAN, "max_steps=2", "log_every=1"])
    result = run_training(config, tmp_path, build)
    assert seen == {0: (True, False, False), 1: (True, False, True)}  # step 1: generator updated, discriminator not
    assert result.skipped_steps == 0


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    config = load_config("tiny_fvq", [*TINY, "max_steps=20", "log_every=0", "max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*last at step 4; 3 skipped in all"):
        run_training(config, tmp_path, poisoned({2, 3, 4}))
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_an_optimizer_without_a_fused_kernel_decides_on_the_host(tmp_path):
    from fvq.distributed import DistributedContext
    from fvq.training.engine import Engine

    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    config = load_config("tiny_fvq", TINY)
    config.quantizer = {"type": "fsq", "levels": [4, 4, 4], "codebook_dim": 16}  # no search: its own reads
    engine = Engine(config, tmp_path, ctx)
    task = TokenizerTask(engine)
    params = task.optimizers["g"][0].param_groups[0]["params"]
    task.optimizers["g"] = (torch.optim.Adam(params, lr=1e-3), 1e-3)  # per-tensor Adam: no found_inf hook
    engine.attach(task)
    data = engine.micro_batches()
    engine.train_step(next(data), 0)
    with count_host_syncs() as counts:
        engine.train_step(next(data), 1)
    # the engine's one read of the flag (the per-tensor Adam also reads its step counts, as it always does)
    assert counts["__bool__"] == 1 and "tolist" not in counts, dict(counts)
