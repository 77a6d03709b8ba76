"""Count the host reads (device-to-host synchronisations on a GPU) of one tokenizer training step, and time steps.

    python scripts/count_host_syncs.py [CONFIG] [key=value ...]

Builds the run of CONFIG (default ``tiny_fvq``) in a temporary folder, runs two warm-up steps, counts the reads of
one step with :func:`fvq.training.host_syncs.count_host_syncs` (a lower bound: reads inside torch's C++ code are not
seen), then times ten steps (no logging, validation or checkpoints; a step itself reads nothing of the engine's: its
skip counts wait for the log step). On a CUDA machine it also runs one step under
``torch.cuda.set_sync_debug_mode("warn")``, which reports every synchronisation the CUDA runtime sees, and prints
the Python lines that caused them.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings

import torch

from fvq.distributed import init_distributed
from fvq.training.config import load_config
from fvq.training.engine import Engine, flush_denormals
from fvq.training.host_syncs import count_host_syncs
from fvq.training.tokenizer_task import TokenizerTask


def main(argv: list[str]) -> None:
    flush_denormals()
    name = argv[0] if argv and "=" not in argv[0] else "tiny_fvq"
    overrides = [a for a in argv if "=" in a]
    config = load_config(name, ["tensorboard=false", "data.val_samples=64", *overrides])
    ctx = init_distributed(config.device)
    engine = Engine(config, tempfile.mkdtemp(), ctx)
    engine.attach(TokenizerTask(engine))
    data = engine.micro_batches()
    batches = [next(data) for _ in range(13)]
    for step in range(2):
        engine.train_step(batches[step], step)
    with count_host_syncs() as counts:
        engine.train_step(batches[2], 2)
    print(f"host reads in one training step: {sum(counts.values())} {dict(counts)}")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.train_step(batches[2], 2)
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
        print(f"CUDA synchronisations reported in one step: {len(caught)}")
        for site in sorted({f"{w.filename}:{w.lineno}" for w in caught}):
            print(f"  from {site}")
    start = time.perf_counter()
    for step in range(3, 13):
        engine.train_step(batches[step], step)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    print(f"step time: {(time.perf_counter() - start) / 10 * 1000:.1f} ms ({config.global_batch_size} images/step)")


if __name__ == "__main__":
    main(sys.argv[1:])
