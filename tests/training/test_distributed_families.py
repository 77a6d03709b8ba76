"""Every quantizer family trains under two gloo processes through the real trainer, replicas staying identical.

All cases run in one spawned pair of processes (a few steps each), so the cost of starting processes is paid once.
The residual quantizer with per-depth codebooks and quantizer dropout 0.9 is the case that once broke: each rank drew
its own depth, so ranks ran different collectives.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp
from quantizers.test_contract import TINY_CONFIGS

from fvq.training.config import load_config
from fvq.training.tokenizer_task import train

# (case id, quantizer config): every registered family at least once, plus the dropout case of the bug
VQ = {"type": "vq", "codebook_size": 32, "codebook_dim": 8, "init": "normal", "init_scale": 1.0}
CASES = [
    *((case, config) for cases in TINY_CONFIGS.values() for case, config, _ in cases),
    ("vq-ema-kmeans-restarts", {**VQ, "codebook_update": "ema", "kmeans_init": True, "restart_every": 1}),
    ("vq-gumbel", {**VQ, "estimator": "gumbel"}),
    ("vq-rotation", {**VQ, "estimator": "rotation"}),
    (
        "residual-per-depth-dropout",
        {
            "type": "residual",
            "num_quantizers": 3,
            "shared_codebook": False,
            "quantizer_dropout": 0.9,
            "quantizer": VQ,
        },
    ),
]

OVERRIDES = [
    "model.preset=tiny_f4",
    "data.image_size=16",  # 4 x 4 latents: the multi-scale case's last scale
    "data.samples_per_epoch=16",
    "data.val_samples=8",
    "global_batch_size=4",
    "max_steps=3",
    "val_every=3",
    "checkpoint_every=0",
    "log_every=1",
    "val_batch_size=4",
    "val_psnr_images=2",
    "tensorboard=false",
]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _worker(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)  # first: a forked child must not enter the parent's OpenMP pool
    results = {}
    for (case, quantizer), port in zip(CASES, ports):
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        config = load_config("tiny_vq", OVERRIDES)
        config.quantizer = copy.deepcopy(quantizer)
        config.device = "cpu"
        try:
            result = train(config, os.path.join(out_dir, case))
            results[case] = {"metrics": result.metrics, "steps": result.steps, "skipped": result.skipped_steps}
        except Exception as err:  # reported by the parent, case by case
            results[case] = {"error": f"{type(err).__name__}: {err}"}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_every_family_trains_on_two_processes_with_identical_replicas():
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children reuse the imported torch instead of re-importing it (seconds on a small CPU)
        ports = _free_ports(len(CASES))
        mp.start_processes(_worker, args=(2, ports, tmp), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    failures = {case: res["error"] for case, res in results[0].items() if "error" in res}
    assert not failures, failures
    for case, _ in CASES:
        res = results[0][case]
        assert res["steps"] == 3 and res["skipped"] == 0, (case, res)
        assert res["metrics"]["val/replicas_in_sync"] == 1.0, case
        assert res["metrics"]["val/tokens"] > 0, case
        # rank 1 reports the same (reduced) figures as rank 0
        assert results[1][case]["metrics"] == res["metrics"], case


def test_quantizer_dropout_depth_is_a_function_of_the_step():
    from fvq.quantizers.registry import build_quantizer

    config = {
        "type": "residual",
        "num_quantizers": 4,
        "shared_codebook": False,
        "quantizer_dropout": 0.9,
        "quantizer": VQ,
    }
    z = torch.randn(2, 8, 4, 4)

    def depths(global_seed: int, steps) -> list[int]:
        torch.manual_seed(global_seed)  # the global RNG must not matter
        q = build_quantizer(config).train()
        found = []
        for step in steps:
            q.set_step(step)
            found.append(int((q(z).indices[0, 0, 0] >= 0).sum()))
        return found

    first = depths(0, range(40))
    assert first == depths(1, range(40))  # another rank
    assert first[25:] == depths(2, range(25, 40))  # a run resumed at step 25
    assert len(set(first)) > 1 and min(first) >= 1  # dropout does happen, never below one depth
