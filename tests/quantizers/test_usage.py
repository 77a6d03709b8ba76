import math

import pytest
import torch

from fvq.quantizers import CodebookUsage
from fvq.quantizers.usage import usage_and_perplexity


def test_usage_over_many_batches():
    acc = CodebookUsage(8)
    acc.update(torch.tensor([0, 1, 1]))
    acc.update(torch.tensor([[2, 2], [2, 7]]))
    report = acc.compute()
    assert report.usage == 4 / 8
    assert report.dead_codes == 4
    assert report.num_tokens == 7
    # counts 1, 2, 3, 1 over 7 tokens
    p = torch.tensor([1, 2, 3, 1], dtype=torch.float64) / 7
    assert report.perplexity == pytest.approx(math.exp(float(-(p * p.log()).sum())))


def test_uniform_use_has_perplexity_k():
    acc = CodebookUsage(16)
    acc.update(torch.arange(16).repeat(5))
    report = acc.compute()
    assert report.usage == 1.0 and report.perplexity == pytest.approx(16.0)


def test_single_code_perplexity_one_and_empty():
    assert float(usage_and_perplexity(torch.tensor([0, 9, 0]))[1]) == pytest.approx(1.0)
    assert CodebookUsage(4).compute().usage == 0.0


def test_out_of_range_indices_rejected():
    acc = CodebookUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        acc.update(torch.tensor([4]))


def test_usage_and_perplexity_known_values():
    usage, perplexity = usage_and_perplexity(torch.tensor([1, 2, 3, 1, 0, 0, 0, 0]))
    assert usage.dtype == perplexity.dtype == torch.float64 and usage.ndim == perplexity.ndim == 0
    assert float(usage) == 4 / 8
    p = torch.tensor([1, 2, 3, 1], dtype=torch.float64) / 7
    assert float(perplexity) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-15)
    assert [float(v) for v in usage_and_perplexity(torch.full((16,), 5))] == [1.0, pytest.approx(16.0, rel=1e-15)]
    assert [float(v) for v in usage_and_perplexity(torch.zeros(4, dtype=torch.long))] == [0.0, 0.0]  # empty
    # only the codes that occur, out of a codebook too large for a dense histogram
    usage, perplexity = usage_and_perplexity(torch.tensor([2, 2]), codebook_size=2**40)
    assert float(usage) == 2 / 2**40 and float(perplexity) == pytest.approx(2.0, rel=1e-15)


def test_batch_metrics_of_dense_and_implicit_codebooks_agree():
    from fvq.quantizers.implicit import implicit_code_metrics
    from fvq.quantizers.vq import batch_code_metrics

    indices = torch.tensor([[3, 3, 0], [7, 3, 0]])
    dense, implicit = batch_code_metrics(indices, 8), implicit_code_metrics(indices, 8)
    assert float(dense["usage"]) == float(implicit["usage"]) == 3 / 8
    torch.testing.assert_close(dense["perplexity"], implicit["perplexity"])
    assert {v.dtype for v in (*dense.values(), *implicit.values())} == {torch.float32}
