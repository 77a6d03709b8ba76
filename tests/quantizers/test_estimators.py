"""Gradient estimators of VectorQuantizer: rotation trick, IBQ, soft and Gumbel assignments, temperature schedule."""

import math

import pytest
import torch

from fvq.quantizers import VectorQuantizer
from fvq.quantizers.estimators import (
    ESTIMATORS,
    annealed_temperature,
    gumbel_quantize,
    index_backprop_quantize,
    rotation_trick,
    soft_quantize,
)


def test_rotation_trick_value_and_gradient_match_the_definition():
    torch.manual_seed(0)
    e = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 3, dtype=torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = rotation_trick(e, q)
    assert torch.equal(out, q)  # forward value is exactly the code
    (out * g).sum().backward()
    for i in range(5):  # explicit D x D rotation of Fifty et al. (2024): dL/de = lambda R^T dL/dq
        ei, qi = e[i].detach(), q[i]
        eh, qh = ei / ei.norm(), qi / qi.norm()
        r = (eh + qh) / (eh + qh).norm()
        rot = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, eh)
        lam = qi.norm() / ei.norm()
        torch.testing.assert_close(lam * rot @ ei, qi)  # R maps e onto q after scaling
        torch.testing.assert_close(e.grad[i], lam * rot.t() @ g[i])


def test_rotation_trick_handles_opposite_and_zero_vectors():
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[-2.0, 0.0], [1.0, 1.0]])
    out = rotation_trick(e, q)
    out.sum().backward()
    assert torch.isfinite(e.grad).all()
    # q^ = -e^: r = 0 and R = I - 2 e^ e^T, the reflection along e (maps e^ to q^); scaled by lambda = 2
    torch.testing.assert_close(e.grad[0], torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(e.grad[1], torch.ones(2))  # zero vector: straight-through


def test_ibq_gives_gradient_to_all_codes_and_keeps_the_exact_code():
    torch.manual_seed(1)
    z = torch.randn(6, 4, requires_grad=True)
    codes = torch.randn(10, 4, requires_grad=True)
    idx = torch.cdist(z.detach(), codes.detach()).argmin(dim=1)
    out = index_backprop_quantize(z, codes, idx, temperature=1.0)
    assert torch.equal(out, codes.detach()[idx])
    out.square().sum().backward()
    assert bool((codes.grad.abs().sum(dim=1) > 0).all())  # every code, also never-selected ones
    assert z.grad is not None and z.grad.abs().sum() > 0
    # same gradient as the dense definition z_q = (onehot - sg[p] + p) @ C
    z2, c2 = z.detach().clone().requires_grad_(), codes.detach().clone().requires_grad_()
    p = (-(torch.cdist(z2, c2) ** 2)).softmax(dim=-1)
    onehot = torch.nn.functional.one_hot(idx, 10).float()
    ((onehot - p.detach() + p) @ c2).square().sum().backward()
    torch.testing.assert_close(codes.grad, c2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z.grad, z2.grad, atol=1e-5, rtol=1e-4)


def test_chunked_soft_estimators_equal_the_unchunked_ones():
    torch.manual_seed(2)
    z = torch.randn(37, 4, requires_grad=True)
    codes = torch.randn(16, 4, requires_grad=True)
    grads = []
    for chunk_bytes in (64 * 2**20, 16 * 16 * 3):  # one block; blocks of 3 rows (checkpointed)
        z.grad = codes.grad = None
        out = soft_quantize(z, codes, 0.5, chunk_bytes)
        out.square().sum().backward()
        grads.append((out.detach(), z.grad.clone(), codes.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    p = (-(torch.cdist(z.detach(), codes.detach()) ** 2) / 0.5).softmax(dim=-1)
    torch.testing.assert_close(grads[0][0], p @ codes.detach(), atol=1e-5, rtol=1e-4)


def test_gumbel_samples_codes_with_relaxed_gradient():
    torch.manual_seed(3)
    z = torch.randn(400, 2, requires_grad=True)
    codes = torch.randn(5, 2, requires_grad=True)
    out, idx = gumbel_quantize(z, codes, temperature=1.0, max_chunk_bytes=16 * 5 * 150)
    assert torch.equal(out, codes.detach()[idx])
    out.sum().backward()
    assert z.grad.abs().sum() > 0 and bool((codes.grad.abs().sum(dim=1) > 0).all())
    nearest = torch.cdist(z.detach(), codes.detach()).argmin(dim=1)
    agree = float((idx == nearest).float().mean())
    assert 0.3 < agree < 1.0  # a sample of softmax(-d^2): mostly, not always, the nearest code


def test_temperature_schedule_is_a_pure_exponential_function_of_the_step():
    assert annealed_temperature(0, 1.0, 0.01, 100) == 1.0
    assert math.isclose(annealed_temperature(50, 1.0, 0.01, 100), 0.1)
    assert math.isclose(annealed_temperature(500, 1.0, 0.01, 100), 0.01)
    assert annealed_temperature(50, 2.0) == 2.0
    q = VectorQuantizer(8, 2, estimator="soft", temperature=1.0, temperature_final=0.01, temperature_anneal_steps=100)
    q.set_step(50)
    assert math.isclose(q.current_temperature(), 0.1)
    assert math.isclose(float(q.train()(torch.randn(4, 2)).metrics["temperature"]), 0.1, rel_tol=1e-6)
    with pytest.raises(ValueError):
        annealed_temperature(0, 0.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_and_eval_is_exact(estimator):
    torch.manual_seed(4)
    q = VectorQuantizer(16, 4, estimator=estimator, init="normal", init_scale=1.0, max_chunk_bytes=16 * 16 * 5)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q.train()(z)
    (out.loss + out.quantized.square().mean()).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.codebook.grad is not None and torch.isfinite(q.codebook.grad).all()
    if estimator == "ibq":
        assert bool((q.codebook.grad.abs().sum(dim=1) > 0).all())
    if estimator != "soft":  # the decoder sees a code vector
        flat = out.quantized.detach().permute(0, 2, 3, 1).reshape(-1, 4)
        assert torch.equal(flat, q.codebook.detach()[out.indices.reshape(-1)])
    q.eval()
    with torch.no_grad():
        ev = q(z)
        assert torch.equal(q.decode(q.encode(z)), ev.quantized)
        assert torch.equal(q.export()(z).quantized, ev.quantized)


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator must be one of"):
        VectorQuantizer(8, 2, estimator="reinforce")
