"""``fvq export`` on a real (two-step) training run, and ``fvq import-llamagen`` on a LlamaGen-layout checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_runs import TINY_TOKENIZER

from fvq.cli import main
from fvq.inference import ExportVerificationError, load_model, model_identity, verify_export
from fvq.models import Tokenizer
from fvq.models.presets import build_autoencoder

TINY = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=16",
    "data.val_samples=8",
    "global_batch_size=8",
    "max_steps=2",
    "val_every=2",
    "checkpoint_every=2",
    "log_every=1",
    "val_batch_size=8",
    "tensorboard=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "tiny_fvq", "--out", str(path), *TINY]) == 0
    return path


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_export_round_trip(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "model.safetensors") in printed and "identical indices and reconstructions" in printed

    trained = load_model(run, export=False).tokenizer  # training model: raw codebook + VQBridge
    exported = Tokenizer.from_pretrained(out)
    bridge = sum(p.numel() for n, p in trained.named_parameters() if n.startswith("quantizer.projector."))
    assert bridge > 0
    assert trained.num_parameters() - exported.num_parameters() == bridge
    assert f"{trained.num_parameters():,} -> {exported.num_parameters():,}" in printed
    assert not any("projector" in k for k in exported.state_dict())

    x = _images()
    with torch.no_grad():
        expected = trained(x)
        ids = exported.encode(x)
        reconstruction = exported.decode(ids)
    assert len(expected.indices.unique()) > 1
    assert torch.equal(ids, expected.indices)
    assert torch.equal(reconstruction, expected.reconstruction)
    # every code, not only the ones these images hit, decodes identically
    all_ids = torch.arange(64).view(4, 4, 4)
    with torch.no_grad():
        assert torch.equal(exported.decode(all_ids), trained.decode(all_ids))

    # a smaller file than the same model saved with its bridge
    trained.save_pretrained(tmp_path / "with_bridge")
    assert (out / "model.safetensors").stat().st_size < (tmp_path / "with_bridge" / "model.safetensors").stat().st_size
    config = json.loads((out / "config.json").read_text())
    assert "projector" not in config["quantizer"]
    provenance = config["exported_from"]
    assert provenance["quantizer"]["projector"]["type"] == "vq_bridge"
    assert (provenance["step"], provenance["image_size"], provenance["checkpoint"]) == (2, 16, "step_00000002.pt")
    # a run and its export are the same model
    assert model_identity(run) == model_identity(out) == model_identity(trained)
    assert load_model(out).image_size == 16


def test_export_refuses_a_non_empty_folder(run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "model.safetensors").exists()
    assert main(["export", str(run / "checkpoints" / "step_00000002.pt"), "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert main(["export", str(run), "--out", str(run), "--force"]) == 2  # would turn the run into an "export"
    assert "being exported" in capsys.readouterr().err and not (run / "config.json").exists()
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no model, run folder or checkpoint" in capsys.readouterr().err


def test_verify_export_detects_a_changed_code(run):
    trained = load_model(run, export=False).tokenizer
    exported = trained.export().eval()
    verify_export(trained, exported, image_size=16)
    with torch.no_grad():  # a change far below what training would notice
        exported.quantizer.codebook.add_(1e-5 * torch.randn(exported.quantizer.codebook.shape))
    with pytest.raises(ExportVerificationError, match="differs from the training model"):
        verify_export(trained, exported, image_size=16)


def test_failed_verification_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    import fvq.inference.export

    def broken(*args, **kwargs):
        raise ExportVerificationError("indices on probe images: 3 of 96 indices differ")

    monkeypatch.setattr(fvq.inference.export, "verify_export", broken)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 1
    assert "3 of 96 indices differ" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
def _llamagen_checkpoint(path, codebook_dim: int, l2_norm: bool | None):
    """A LlamaGen-layout training checkpoint (DDP prefixes, optimizer, argparse args) with random weights."""
    torch.manual_seed(0)
    encoder, decoder = build_autoencoder({"preset": "tiny_f4"})
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    z = encoder.z_channels
    state.update(
        {
            "quant_conv.weight": torch.randn(codebook_dim, z, 1, 1) * 0.1,
            "quant_conv.bias": torch.randn(codebook_dim) * 0.1,
            "post_quant_conv.weight": torch.randn(z, codebook_dim, 1, 1) * 0.1,
            "post_quant_conv.bias": torch.randn(z) * 0.1,
            "quantize.embedding.weight": torch.randn(128, codebook_dim),
            "quantize.codebook_used": torch.zeros(65536),
        }
    )
    checkpoint = {"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "steps": 10}
    if l2_norm is not None:
        checkpoint["args"] = argparse.Namespace(codebook_l2_norm=l2_norm)
    torch.save(checkpoint, path)
    return state


def test_import_llamagen_cli(tmp_path, capsys):
    state = _llamagen_checkpoint(tmp_path / "vq.pt", codebook_dim=8, l2_norm=None)
    base = ["import-llamagen", str(tmp_path / "vq.pt"), "--norm-groups", "8"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    printed = capsys.readouterr().out
    assert "distance cosine" in printed and "codebook_dim=8" in printed
    imported = Tokenizer.from_pretrained(tmp_path / "auto")
    assert imported.quantizer.distance == "cosine" and imported.codebook_size == 128
    assert torch.equal(imported.quantizer.codebook, state["quantize.embedding.weight"])
    assert torch.equal(imported.encoder.conv_in.weight, state["encoder.conv_in.weight"])

    assert main([*base, "--out", str(tmp_path / "fvq"), "--source", "fvq"]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "fvq").quantizer.distance == "l2"
    assert model_identity(tmp_path / "fvq") != model_identity(tmp_path / "auto")  # same weights, another search

    assert main([*base, "--out", str(tmp_path / "fvq")]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--state-dict-key", "generator"]) == 2
    assert "no entry 'generator'" in capsys.readouterr().err


def test_import_uses_checkpoint_args(tmp_path):
    _llamagen_checkpoint(tmp_path / "vq.pt", codebook_dim=64, l2_norm=True)
    assert main(["import-llamagen", str(tmp_path / "vq.pt"), "--norm-groups", "8", "--out", str(tmp_path / "o")]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "o").quantizer.distance == "cosine"  # args win over the dim rule
