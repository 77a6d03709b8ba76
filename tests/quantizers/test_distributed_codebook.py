"""Two gloo processes with different data: k-means init, EMA steps and restarts leave identical codebooks."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fvq import distributed as fdist
from fvq.quantizers import CodebookUsage, VectorQuantizer

K, D, STEPS = 16, 4, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # first: a forked child must not enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert fdist.is_distributed() and fdist.rank() == rank and fdist.world_size() == world
        torch.manual_seed(100 + rank)  # different initial codebooks and data on each rank
        results = {}
        for update, strategy in (("ema", "random"), ("ema", "split"), ("gradient", "highest_error")):
            q = VectorQuantizer(
                K,
                D,
                init="normal",
                init_scale=1.0,
                codebook_update=update,
                kmeans_init=True,
                kmeans_iters=3,
                restart_strategy=strategy,
                restart_every=2,
                restart_threshold=2.0,
            )
            opt = torch.optim.SGD(q.parameters(), lr=0.1) if update == "gradient" else None
            usage = CodebookUsage(K)
            for _ in range(STEPS):
                z = torch.randn(40, D) * (1 + rank) + rank  # rank-dependent data
                out = q.train()(z)
                if opt is not None:  # DDP would average these; do it by hand
                    opt.zero_grad()
                    out.loss.backward()
                    for p in q.parameters():
                        fdist.all_reduce_sum_(p.grad).div_(world)
                    opt.step()
                usage.update(out.indices)
            codebooks = fdist.all_gather_tensor(q.codebook.detach().clone())
            state = {k: v for k, v in q.state_dict().items() if v.is_floating_point()}
            same_state = all(torch.equal(*fdist.all_gather_tensor(v.clone())) for v in state.values())
            report = usage.compute()
            reports = [None] * world
            dist.all_gather_object(reports, report.as_dict())
            results[f"{update}-{strategy}"] = {
                "codebooks_equal": all(torch.equal(codebooks[0], c) for c in codebooks),
                "state_equal": same_state,
                "reports": reports,
                "restarted_total": int(q.restarter.restarted_total),
                "local_tokens": int(usage.counts.sum()),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_identical_codebooks_and_usage():
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children reuse the imported torch instead of re-importing it (seconds on a small CPU)
        mp.start_processes(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for name, res in results[0].items():
        other = results[1][name]
        assert res["codebooks_equal"] and other["codebooks_equal"], name
        assert res["state_equal"] and other["state_equal"], name
        assert res["reports"][0] == res["reports"][1], name  # both ranks report the same, gathered usage
        assert res["reports"][0]["tokens"] == 2 * STEPS * 40  # counted over both ranks
        assert res["local_tokens"] == STEPS * 40
        assert res["restarted_total"] == other["restarted_total"] and res["restarted_total"] > 0, name
