import math

import pytest
import torch

from fvq.quantizers import CodebookUsage
from fvq.quantizers.functional import perplexity_from_counts


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
    assert perplexity_from_counts(torch.tensor([0, 9, 0])) == pytest.approx(1.0)
    assert CodebookUsage(4).compute().usage == 0.0


def test_out_of_range_indices_rejected():
    acc = CodebookUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        acc.update(torch.tensor([4]))
