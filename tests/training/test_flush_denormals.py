"""The trainer flushes subnormal floats to zero in every CPU thread (they slow CPU kernels 10-100x)."""

import subprocess
import sys

import pytest

SCRIPT = """
import torch
torch.set_num_threads(2)
{call}
x = torch.full((1 << 20,), 1e-30)
y = x * 1e-10  # 1e-40 is subnormal in fp32; the product is computed by the intra-op worker threads too
print(int((y == 0).sum()), y.numel())
"""


def run(call: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(call=call)], capture_output=True, text=True, check=True)
    zeros, total = map(int, out.stdout.split())
    return zeros, total


def test_subnormal_results_are_flushed_in_all_threads():
    zeros, total = run("pass")
    if zeros == total:
        pytest.skip("this CPU flushes subnormals by default")
    assert zeros == 0  # without the flag every product is a (slow) subnormal
    zeros, total = run("from fvq.training.engine import flush_denormals\nassert flush_denormals()")
    assert zeros == total
