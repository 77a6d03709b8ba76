"""``fvq eval-gen`` end to end on a handful of tiny images through the real FID Inception, and its input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fvq.cli import main
from fvq.evaluation.inception import FIDInception, find_packaged_inception
from fvq.evaluation.inception_is import ClassifierInception
from fvq.weights import sha256_file

needs_inception = pytest.mark.skipif(find_packaged_inception() is None, reason="FID Inception weights not installed")


@pytest.fixture
def no_classifier(monkeypatch, tmp_path):
    monkeypatch.delenv("FVQ_IS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture
def passes(monkeypatch):
    """Counts the images that go through the FID Inception and through the classifier network."""
    seen = {"inception": 0, "classifier": 0}
    run_network, forward = FIDInception.run_network, ClassifierInception.forward

    def counting_run(self, x):
        seen["inception"] += x.shape[0]
        return run_network(self, x)

    def counting_forward(self, x):
        seen["classifier"] += x.shape[0]
        return forward(self, x)

    monkeypatch.setattr(FIDInception, "run_network", counting_run)
    monkeypatch.setattr(ClassifierInception, "forward", counting_forward)
    return seen


def _photos(folder, n: int, seed: int = 0) -> None:
    """Small smooth colour images of different sizes (smooth, so the Inception sees structure rather than noise)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40 + 4 * i, 36), Image.BILINEAR).save(folder / f"img{i}.png")


def _classifier_of_the_fid_trunk(path) -> str:
    """A classifier file in pytorch-fid's layout whose trunk is the FID Inception's, with a random classifier: the
    case of the real file, whose logits fvq computes from the FID Inception's pool features."""
    from fvq.evaluation.inception import load_inception
    from fvq.evaluation.inception_is import BasicConv2d

    params = [p.detach() for _, p in load_inception().network.net.layers.named_parameters()]
    names = [n for n, m in ClassifierInception().named_modules() if isinstance(m, BasicConv2d)]
    state = {}
    for i, name in enumerate(names):
        weight, beta, mean, var = params[4 * i : 4 * i + 4]
        state |= {f"{name}.conv.weight": weight, f"{name}.bn.weight": torch.ones_like(beta), f"{name}.bn.bias": beta}
        state |= {f"{name}.bn.running_mean": mean, f"{name}.bn.running_var": var}
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) / 40
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)
    return sha256_file(path)


@needs_inception
def test_make_ref_then_eval_gen_end_to_end(tmp_path, no_classifier, passes, capsys):
    cache = str(tmp_path / "cache")
    _photos(tmp_path / "real", 5)
    ref = tmp_path / "ref.npz"
    common = ["--num-workers", "0", "--quiet", "--cache-dir", cache]
    assert (
        main(["eval-gen", "--make-ref", str(tmp_path / "real"), "--out", str(ref), "--image-size", "32", *common]) == 0
    )
    assert passes["inception"] == 5 and "sha256" in capsys.readouterr().out
    with np.load(ref) as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["mu"].shape == (2048,) and f["sigma_s"].shape == (2023, 2023)

    samples = tmp_path / "gen" / "samples.npz"
    samples.parent.mkdir()
    rng = np.random.default_rng(1)
    np.savez(samples, rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 2]))
    (samples.parent / "sample_config.json").write_text(json.dumps({"cfg_scale": 1.75, "temperature": 1.0}))
    weights = tmp_path / "is.pth"
    digest = _classifier_of_the_fid_trunk(weights)
    out = tmp_path / "out"
    is_args = ["--inception-is", str(weights), "--inception-is-sha256", digest, "--is-split-size", "2"]
    assert main(["eval-gen", str(samples), "--ref", str(ref), "--out", str(out), *is_args, *common]) == 0
    assert passes == {"inception": 5 + 4, "classifier": 0}  # reference features: make-ref's cache; logits: pool
    printed = capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    m = data["metrics"]
    assert set(m) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"}
    assert m["fid"] > 0 and m["sfid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert 1.0 <= m["inception_score"] <= 1008
    assert data["reference"]["sha256"] == sha256_file(ref)
    assert data["counts"]["precision"] == {"samples": 4, "reference": 5}
    assert data["class_balance"]["classes_present"] == 3 and data["sample_settings"]["cfg_scale"] == 1.75
    assert (
        data["protocol"]["classifier"]["sha256"] == digest
        and "FID Inception" in data["protocol"]["classifier"]["trunk"]
    )
    assert data["protocol"]["inception_score"] == {
        "split_size": 2,
        "shuffle_seed": 0,
        "softmax": "over all 1008 logits",
    }
    md = (out / "metrics.md").read_text()
    assert md in printed and "| Inception Score |" in md and sha256_file(ref) in md and "cfg_scale=1.75" in md

    # another reference (statistics only): the samples' features and logits all come from the cache
    stats_ref = tmp_path / "stats.npz"
    with np.load(ref) as f:
        np.savez(stats_ref, **{k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    out2 = tmp_path / "out2"
    assert main(["eval-gen", str(samples), "--ref", str(stats_ref), "--out", str(out2), *is_args, *common]) == 0
    assert passes == {"inception": 9, "classifier": 0}
    again = json.loads((out2 / "metrics.json").read_text())
    assert again["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-9)
    assert again["metrics"]["inception_score"] == m["inception_score"]
    assert "precision" in again["unavailable"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give SAMPLES"),
        (["{tmp}/none.npz", "--ref", "{tmp}/ref.npz"], "do not exist"),
        (["{tmp}/s.npz"], "--ref REF.npz is required"),
        (["{tmp}/s.npz", "--ref", "{tmp}/none.npz"], "reference batch .* does not exist"),
        (["{tmp}/float.npz", "--ref", "{tmp}/ref.npz"], "must be uint8"),
        (["{tmp}/chw.npz", "--ref", "{tmp}/ref.npz"], "N x H x W x 3"),
        (["{tmp}/s.npz", "--ref", "{tmp}/half-ref.npz"], "only one of 'mu' and 'sigma'"),
        (["{tmp}/s.npz", "--ref", "{tmp}/ref.npz", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["{tmp}/s.npz", "--ref", "{tmp}/ref.npz", "--inception-is", "{tmp}/none.pth"], "not found at"),
        (["--make-ref", "{tmp}/none", "--out", "{tmp}/r.npz"], "not a folder"),
        (["--make-ref", "{tmp}", "--out", "{tmp}/ref.npz"], "exists"),
        (["--make-ref", "{tmp}", "--out", "{tmp}/r.npy"], "must end in .npz"),
        (["--make-ref", "{tmp}"], "needs --out"),
        (["{tmp}/s.npz", "--make-ref", "{tmp}", "--out", "{tmp}/r.npz"], "takes neither SAMPLES nor --ref"),
    ],
)
def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, no_classifier, capsys, argv, message):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    np.savez(tmp_path / "float.npz", images.astype(np.float32) / 255)
    np.savez(tmp_path / "chw.npz", images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "ref.npz", images)
    np.savez(tmp_path / "half-ref.npz", mu=np.zeros(2048))
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    default_out = [] if "--out" in args or "--make-ref" in args else ["--out", str(out)]
    code = main(["eval-gen", *args, *default_out, "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fvq eval-gen: error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no partial file
