"""``fvq sample`` through the real CLI: the files it writes, the same bytes for any batch size and for two gloo
processes, per-class plans, resume after an interruption, and the inputs it refuses without writing anything."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from tiny_generators import CLASSES, TOKENIZER, export, tiny_gpt

import fvq.inference.generate as generate_module
from fvq.cli import main
from fvq.inference import load_model
from fvq.models import Tokenizer

SETTINGS = ["--num-samples", "7", "--cfg-scale", "1.5", "--top-p", "0.9", "--seed", "1", "--npz", "--no-progress"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cli")
    torch.manual_seed(0)
    Tokenizer.from_config(TOKENIZER).eval().save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    Tokenizer.from_config(TOKENIZER).eval().save_pretrained(root / "other_tokenizer")
    identity = load_model(root / "tokenizer").identity
    export(tiny_gpt(0), root / "run" / "model", identity)
    export(tiny_gpt(0, class_dropout_prob=0.0), root / "no_null" / "model", identity)
    export(tiny_gpt(0, vocab_size=64), root / "wide" / "model", identity)
    return {
        "root": root,
        "tokenizer": str(root / "tokenizer"),
        "other": str(root / "other_tokenizer"),
        "run": str(root / "run"),
        "no_null": str(root / "no_null"),
        "wide": str(root / "wide"),
    }


def sample(paths, out, *extra: str, generator: str | None = None, tokenizer: str | None = None) -> int:
    args = ["sample", generator or paths["run"], "--tokenizer", tokenizer or paths["tokenizer"], "--out", str(out)]
    return main([*args, *extra])


def pngs(folder) -> dict[str, bytes]:
    images = folder / "images"
    return {name: (images / name).read_bytes() for name in sorted(os.listdir(images))}


@pytest.fixture(scope="module")
def reference(paths):
    """One process, batch 3."""
    out = paths["root"] / "reference"
    assert sample(paths, out, *SETTINGS, "--batch-size", "3") == 0
    return out


def test_files_written(paths, reference):
    from fvq.evaluation.generation import open_samples

    record = json.loads((reference / "sample_config.json").read_text())
    labels = json.loads((reference / "labels.json").read_text())
    assert len(labels) == 7 and all(0 <= c < CLASSES for c in labels)
    assert list(pngs(reference)) == [f"{i:06d}_c{c}.png" for i, c in enumerate(labels)]
    with np.load(reference / "samples.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 16, 16, 3)
        assert data["labels"].tolist() == labels
        for i, name in enumerate(pngs(reference)):
            assert np.array_equal(np.asarray(Image.open(reference / "images" / name)), data["arr_0"][i])
    assert record["status"] == "complete" and record["num_samples"] == 7 and record["num_classes"] == CLASSES
    assert record["settings"]["tokenizer_identity"] == load_model(paths["tokenizer"]).identity
    assert record["generator"]["tokenizer"]["model_identity"] == record["tokenizer"]["identity"]
    assert (record["cfg_scale"], record["top_p"], record["seed"], record["image_size"]) == (1.5, 0.9, 1, [16, 16])
    assert sum(record["class_counts"]) == 7 and record["class_balance"]["classes_present"] <= CLASSES
    assert record["fvq_version"] and record["run"]["world_size"] == 1 and record["run"]["batch_size"] == 3
    samples = open_samples(reference / "samples.npz")  # what fvq eval-gen reads
    assert samples.num_images == 7 and samples.labels.tolist() == labels
    assert open_samples(reference).num_images == 7  # the folder: PNGs under images/


@pytest.mark.parametrize("batch_size", ["1", "8"])
def test_batch_size_does_not_change_the_files(paths, reference, tmp_path, batch_size):
    assert sample(paths, tmp_path, *SETTINGS, "--batch-size", batch_size) == 0
    assert pngs(tmp_path) == pngs(reference)
    assert (tmp_path / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    torch.set_num_threads(1)  # first: a forked child must not enter the parent's OpenMP pool
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if main(argv) != 0:
        raise SystemExit(1)


def test_two_processes_write_the_same_files(paths, reference, tmp_path):
    argv = ["sample", paths["run"], "--tokenizer", paths["tokenizer"], "--out", str(tmp_path), *SETTINGS]
    argv += ["--batch-size", "2", "--device", "cpu"]
    # fork: the children reuse the imported torch instead of re-importing it (seconds on a small CPU)
    mp.start_processes(_rank, args=(2, _free_port(), argv), nprocs=2, join=True, start_method="fork")
    assert pngs(tmp_path) == pngs(reference)
    assert (tmp_path / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    record = json.loads((tmp_path / "sample_config.json").read_text())
    assert record["run"]["world_size"] == 2 and record["run"]["generated"] == 7
    assert record["settings"] == json.loads((reference / "sample_config.json").read_text())["settings"]


def test_per_class(paths, tmp_path):
    assert sample(paths, tmp_path / "all", "--per-class", "2", "--no-progress") == 0
    assert json.loads((tmp_path / "all" / "labels.json").read_text()) == list(range(CLASSES)) * 2
    record = json.loads((tmp_path / "all" / "sample_config.json").read_text())
    assert record["class_counts"] == [2] * CLASSES and record["class_balance"]["uniform"]
    assert sample(paths, tmp_path / "some", "--classes", "4,1", "--per-class", "2", "--no-progress") == 0
    assert list(pngs(tmp_path / "some")) == ["000000_c4.png", "000001_c1.png", "000002_c4.png", "000003_c1.png"]


def test_resume_after_an_interruption(paths, reference, tmp_path, monkeypatch):
    real, calls = generate_module.write_images, []

    def interrupted(images, names, out_dir):
        calls.append(names)
        if len(calls) > 1:
            raise RuntimeError("interrupted")
        return real(images, names, out_dir)

    monkeypatch.setattr(generate_module, "write_images", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample(paths, tmp_path, *SETTINGS, "--batch-size", "3")
    assert len(pngs(tmp_path)) == 3 and not (tmp_path / "samples.npz").exists()
    monkeypatch.setattr(generate_module, "write_images", real)
    assert sample(paths, tmp_path, *SETTINGS, "--batch-size", "2") == 0
    assert pngs(tmp_path) == pngs(reference)
    assert (tmp_path / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    record = json.loads((tmp_path / "sample_config.json").read_text())
    assert (record["run"]["generated"], record["run"]["reused"]) == (4, 3)


def test_npz_only(paths, reference, tmp_path):
    assert sample(paths, tmp_path, *SETTINGS, "--no-png") == 0
    assert not (tmp_path / "images").exists()
    assert (tmp_path / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_refusals_write_nothing(paths, reference, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (("--classes", "0,9"), {}, "class ids [9] are outside the generator's 5 classes"),
        (("--num-samples", "2", "--cfg-scale", "2"), {"generator": paths["no_null"]}, "needs the null class"),
        (("--num-samples", "2"), {"tokenizer": paths["other"]}, "was trained on tokens of the tokenizer with identity"),
        (("--num-samples", "2", "--force"), {"generator": paths["wide"]}, "predicts 64 token ids"),
        (("--num-samples", "2", "--no-png"), {}, "--no-png needs --npz"),
        (("--num-samples", "2", "--per-class", "1"), {}, "not both"),
        (("--seed", "1"), {}, "choose the classes"),
        (("--num-samples", "2", "--top-p", "0"), {}, "top_p must be in"),
    ]
    before = _listing(tmp_path), _listing(reference)
    for extra, models, message in cases:
        assert sample(paths, out, *extra, **models) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    other_seed = [v if v != "1" else "2" for v in SETTINGS]  # --seed 2
    assert sample(paths, reference, *other_seed) == 2
    err = capsys.readouterr().err
    assert "holds samples of another run" in err and "seed: 1 there vs 2 now" in err
    assert (_listing(tmp_path), _listing(reference)) == before

    assert sample(paths, out, "--num-samples", "2", "--no-progress", tokenizer=paths["other"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and load_model(paths["other"]).identity in err
    assert sample(paths, out, "--num-samples", "2", "--no-progress", "--force", tokenizer=paths["other"]) == 0
    record = json.loads((out / "sample_config.json").read_text())
    assert record["force"] and record["tokenizer"]["identity"] == load_model(paths["other"]).identity
