"""EMA updates, k-means initialisation and dead-code restarts of VectorQuantizer, with known answers."""

import pytest
import torch

from fvq.quantizers import LinearProjector, VectorQuantizer
from fvq.quantizers.codebook_dynamics import (
    DeadCodeRestarter,
    ema_codebook_update_,
    flush_subnormals_,
    laplace_smoothed_counts,
)
from fvq.quantizers.kmeans import kmeans, kmeans_plus_plus_seeding


def _hand_example():
    # K = 3 codes in D = 2; four latents, of which two go to code 0, two to code 2, none to code 1
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [4.0, 0.0]])
    latents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.0, 2.0], [6.0, 0.0]])
    return codebook, latents


@pytest.mark.parametrize("laplace", [False, True])
def test_ema_update_matches_the_survey_formulas(laplace):
    codebook, latents = _hand_example()
    gamma, eps = 0.5, 1e-5
    q = VectorQuantizer(3, 2, codebook_update="ema", ema_decay=gamma, ema_epsilon=eps, ema_laplace_smoothing=laplace)
    q.codebook.copy_(codebook)
    q.ema_embed_sum.copy_(codebook)  # N = 1 per code, M = C
    assert not any(p is q.codebook for p in q.parameters())  # a buffer, no gradient
    out = q(latents)
    assert out.indices.tolist() == [0, 0, 2, 2]
    assert set(out.losses) == {"commitment"}
    # by hand: n = (2, 0, 2), m = ((1, 1), (0, 0), (10, 2))
    n_expected = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1, 0.5 * 1 + 0.5 * 2])  # (1.5, 0.5, 1.5)
    m_expected = torch.tensor(
        [[0.5 * 0 + 0.5 * 1, 0.5 * 0 + 0.5 * 1], [5.0, 5.0], [0.5 * 4 + 0.5 * 10, 0.5 * 0 + 0.5 * 2]]
    )
    torch.testing.assert_close(q.ema_cluster_size, n_expected)
    torch.testing.assert_close(q.ema_embed_sum, m_expected)
    if laplace:  # N~ = (N + eps) / (sum N + K eps) * sum N
        total = n_expected.sum()
        denom = (n_expected + eps) / (total + 3 * eps) * total
    else:  # e = M / (N + eps)
        denom = n_expected + eps
    torch.testing.assert_close(q.codebook, m_expected / denom[:, None])
    torch.testing.assert_close(
        q.codebook[0], torch.tensor([1 / 3, 1 / 3]), atol=1e-4, rtol=0
    )  # mean moves 2/3 of the way


def test_laplace_smoothing_keeps_the_total():
    n = torch.tensor([3.0, 0.0, 1.0])
    s = laplace_smoothed_counts(n, 0.1)
    torch.testing.assert_close(s.sum(), n.sum())
    assert s[1] > 0


def test_ema_flushes_subnormals():
    codebook = torch.ones(2, 2)
    size, emb = torch.tensor([1.0, 1e-37]), torch.tensor([[1.0, 1.0], [1e-37, 1e-37]])
    counts, sums = torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    ema_codebook_update_(codebook, size, emb, counts, sums, decay=0.01, epsilon=1e-5, laplace_smoothing=False)
    tiny = torch.finfo(torch.float32).tiny
    for t in (codebook, size, emb):
        assert bool(((t == 0) | (t.abs() >= tiny)).all())
    assert size[1] == 0 and bool((emb[1] == 0).all())
    x = torch.tensor([1e-40, -1e-42, 1.0])
    assert flush_subnormals_(x).tolist() == [0.0, 0.0, 1.0]


def _blobs(n_per=40, centers=8, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g) * 5
    return (c[:, None, :] + 0.1 * torch.randn(centers, n_per, dim, generator=g)).reshape(-1, dim)


def _error(q, z):
    q.eval()
    with torch.no_grad():
        return float((q(z).quantized - z).square().sum(dim=1).mean())


def test_kmeans_init_lowers_quantization_error_and_is_done_once():
    z = _blobs()
    torch.manual_seed(0)
    plain = VectorQuantizer(8, 4, init="normal", init_scale=1.0)
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, init="normal", init_scale=1.0, kmeans_init=True, kmeans_iters=10)
    assert not bool(q.initted)
    q.train()(z)
    assert bool(q.initted)
    err_plain, err_kmeans = _error(plain, z), _error(q, z)
    assert err_kmeans < 0.1 * err_plain
    assert err_kmeans < 0.05  # eight tight blobs, eight codes: about the blobs' variance (4 * 0.01)
    # done once: a second training batch does not re-run k-means
    before = q.codebook.detach().clone()
    q.train()(torch.randn(50, 4) * 100)
    assert torch.equal(q.codebook.detach(), before)
    # survives save/load
    fresh = VectorQuantizer(8, 4, kmeans_init=True)
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.initted)


def test_kmeans_pools_several_batches_before_running():
    q = VectorQuantizer(8, 4, kmeans_init=True, kmeans_batches=3)
    z = _blobs()
    for i, chunk in enumerate(z.chunk(3)):
        q.train()(chunk)
        assert bool(q.initted) == (i == 2)


def test_kmeans_on_a_random_subset_of_the_pool():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, kmeans_init=True, kmeans_max_samples=64)
    z = _blobs()  # 320 latents, 64 used
    q.train()(z)
    assert bool(q.initted) and _error(q, z) < 0.05


def test_kmeans_with_ema_sets_statistics_to_the_centroids():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, kmeans_init=True, codebook_update="ema", ema_decay=0.0)
    z = _blobs()
    q.train()(z)
    # decay 0: after the step the codebook is exactly the mean of each code's latents (a Lloyd step on the blobs)
    assert _error(q, z) < 0.05


def test_kmeans_function_counts_and_inertia():
    z = _blobs(n_per=10, centers=3, dim=2)
    res = kmeans(z, 3, iters=5, generator=torch.Generator().manual_seed(0))
    assert res.centroids.shape == (3, 2) and sorted(res.counts.tolist()) == [10.0, 10.0, 10.0]
    assert float(res.inertia) < 0.05
    with pytest.raises(ValueError, match="at least as many samples"):
        kmeans(z[:2], 3)
    with pytest.raises(ValueError, match="seeding"):
        kmeans(z, 3, seeding="farthest")


@pytest.mark.parametrize("clusters", [64, 1024])  # one centre per round (exact k-means++), then 4 of 8 candidates
def test_kmeans_plus_plus_seeding_takes_one_sample_of_every_tight_cluster(clusters):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(clusters, 16, generator=gen) * 10.0
    samples = (centers[:, None] + 0.01 * torch.randn(clusters, 4, 16, generator=gen)).reshape(-1, 16)  # 4 per cluster
    seeds = kmeans_plus_plus_seeding(samples, clusters, torch.Generator().manual_seed(1))
    # every seed is a sample, and D^2 sampling leaves no cluster unseeded: the others are ~10^6 times farther
    assert (seeds[:, None] == samples[None]).all(dim=2).any(dim=1).all()
    assert torch.cdist(seeds, centers).argmin(dim=1).unique().numel() == clusters
    again = kmeans_plus_plus_seeding(samples, clusters, torch.Generator().manual_seed(1))
    assert torch.equal(seeds, again)


def test_kmeans_plus_plus_seeding_of_duplicates_draws_distinct_samples():
    samples = torch.randn(5, 8).repeat(20, 1)  # 100 samples, 5 distinct values
    seeds = kmeans_plus_plus_seeding(samples, 40, torch.Generator().manual_seed(0))
    assert seeds.shape == (40, 8) and torch.unique(seeds, dim=0).shape[0] == 5
    with pytest.raises(ValueError, match="num_clusters <= samples"):
        kmeans_plus_plus_seeding(samples, 101)


@pytest.mark.parametrize("strategy", ["random", "highest_error", "split"])
@pytest.mark.parametrize("update", ["gradient", "ema"])
def test_dead_code_is_revived_and_counted(strategy, update):
    torch.manual_seed(0)
    q = VectorQuantizer(
        4,
        2,
        codebook_update=update,
        restart_strategy=strategy,
        restart_every=3,
        restart_threshold=0.5,
        restart_noise=0.0,
    )
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))  # code 3 is far away
        if update == "ema":
            q.ema_embed_sum.copy_(q.codebook)
    z = torch.rand(64, 2)  # all in [0, 1]^2: code 3 never wins
    restarted = []
    for _ in range(4):
        out = q.train()(z)
        restarted.append(int(out.metrics["restarted"]))
    assert restarted == [0, 0, 0, 1]  # checked before the 4th step, after 3 observed steps
    assert int(out.metrics["restarted_total"]) == 1
    assert float(q.codebook[3].detach().abs().max()) <= 1.0 + 1e-6  # moved onto the data
    assert 3 in q.eval()(z).indices.tolist() or strategy == "split"  # revived: it wins some latents again
    if strategy == "highest_error" and update == "gradient":  # exactly the worst-represented latent (no EMA drift)
        errs = torch.cdist(z, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])).min(dim=1).values
        torch.testing.assert_close(q.codebook[3].detach(), z[errs.argmax()])


def test_split_copies_a_popular_code_and_shares_its_statistics():
    torch.manual_seed(0)
    q = VectorQuantizer(
        3, 2, codebook_update="ema", ema_decay=0.999, restart_strategy="split", restart_every=2, restart_noise=0.0
    )
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]]))
        q.ema_embed_sum.copy_(q.codebook)
    z = torch.cat([torch.zeros(30, 2) + 0.01, torch.full((10, 2), 5.0)])  # code 0 most popular
    for _ in range(3):
        q.train()(z)
    # one EMA step (decay 0.999) after the split: both halves still sit on the popular code with half its count
    assert int(q.restarter.restarted_total) == 1
    torch.testing.assert_close(q.codebook[2], q.codebook[0], atol=1e-3, rtol=0)
    n0 = 1.0  # code 0's EMA count: 30 latents per step, halved by the split before step 3
    for _ in range(2):
        n0 = 0.999 * n0 + 0.001 * 30
    n0 /= 2
    torch.testing.assert_close(float(q.ema_cluster_size[2]), 0.999 * n0)
    torch.testing.assert_close(float(q.ema_cluster_size[0]), 0.999 * n0 + 0.001 * 30)


def test_restart_uses_debiased_usage_so_new_codes_are_not_all_reset():
    r = DeadCodeRestarter(4, 2, threshold=1.0, every=1, usage_decay=0.99)
    r.observe(torch.randn(8, 2), torch.tensor([2.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(r.usage_estimate(), torch.tensor([2.0, 2.0, 2.0, 0.0]))
    plan = r.plan(torch.randn(4, 2))
    assert plan.dead.tolist() == [3]


def test_restart_usage_survives_save_load():
    q = VectorQuantizer(4, 2, restart_strategy="random", restart_every=2)
    q.train()(torch.randn(16, 2))
    fresh = VectorQuantizer(4, 2, restart_strategy="random", restart_every=2)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.restarter.usage, q.restarter.usage) and int(fresh.restarter.steps) == 1


def test_eval_mode_changes_nothing_and_stays_an_exact_inverse():
    q = VectorQuantizer(8, 4, codebook_update="ema", kmeans_init=True, restart_strategy="random", restart_every=1)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    assert "restarted" not in out.metrics
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(q.decode(q.encode(z)), out.quantized)
    assert torch.equal(q.export()(z).quantized, out.quantized)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codebook_update": "ema", "projector": LinearProjector(2)}, "projector"),
        ({"kmeans_init": True, "projector": LinearProjector(2)}, "projector"),
        ({"restart_strategy": "random", "projector": LinearProjector(2)}, "projector"),
        ({"codebook_update": "ema", "estimator": "ibq"}, "ibq"),
        ({"codebook_update": "ema", "orthogonality_weight": 1.0}, "orthogonality_weight"),
        ({"codebook_update": "sgd"}, "codebook_update"),
        ({"restart_strategy": "revive"}, "restart_strategy"),
        ({"restart_strategy": "random", "restart_every": 0}, "restart_every"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"kmeans_seeding": "farthest"}, "kmeans_seeding"),
        ({"entropy_weight": -1.0}, "entropy_weight"),
    ],
)
def test_incompatible_or_unknown_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(4, 2, **kwargs)


OPTION_CONFIGS = {
    "ema": {"codebook_update": "ema"},
    "ema-kmeans-restart": {
        "codebook_update": "ema",
        "kmeans_init": True,
        "restart_strategy": "random",
        "restart_every": 1,
    },
    "kmeans-split": {"kmeans_init": True, "restart_strategy": "split", "restart_every": 1},
    "highest-error-cosine": {"distance": "cosine", "restart_strategy": "highest_error", "restart_every": 1},
    "rotation": {"estimator": "rotation"},
    "ibq-entropy": {"estimator": "ibq", "entropy_weight": 0.1, "temperature": 0.5},
    "gumbel-anneal": {
        "estimator": "gumbel",
        "temperature": 2.0,
        "temperature_final": 0.5,
        "temperature_anneal_steps": 4,
    },
    "soft-geometry": {
        "estimator": "soft",
        "orthogonality_weight": 0.1,
        "variance_weight": 0.1,
        "covariance_weight": 0.1,
    },
}


@pytest.mark.parametrize("options", list(OPTION_CONFIGS.values()), ids=list(OPTION_CONFIGS))
def test_options_keep_the_quantizer_contract(options):
    from fvq.quantizers.registry import build_quantizer

    torch.manual_seed(0)
    config = {"type": "vq", "codebook_size": 16, "codebook_dim": 4, "init": "normal", "init_scale": 1.0, **options}
    q = build_quantizer(config)
    for step in range(3):  # a few training steps: init, restarts, EMA, schedules all run
        q.set_step(step)
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        out = q.train()(z)
        ((out.quantized * torch.randn_like(out.quantized)).sum() + out.loss).backward()
        assert z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
        for name, p in q.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert all(torch.isfinite(v) for v in (out.loss, *out.losses.values(), *out.metrics.values()))
    q.eval()
    z = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        ref = q(z)
        assert torch.equal(q.decode(q.encode(z)), ref.quantized)
        assert torch.equal(q.export().eval()(z).quantized, ref.quantized)
        torch.manual_seed(1)
        twin = build_quantizer(config).eval()
        twin.load_state_dict(q.state_dict())
        assert torch.equal(twin(z).quantized, ref.quantized)
