"""The generation API: loading a generator (export, run folder, checkpoint), the tokenizer check, images in memory
(independent of the batch size), class plans, the streamed ``.npz``, and the sample folder (resume, refusals)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_generators import CLASSES, GRID, TOKENIZER, export, tiny_gpt

import fvq.inference.generate as generate_module
from fvq.inference import load_model
from fvq.inference.generate import (
    ClassPlan,
    ForeignGeneratorError,
    LoadedGenerator,
    SamplingOptions,
    check_generator_tokenizer,
    generate_images,
    load_generator,
    pack_npz,
    plan_classes,
    sample_name,
    sample_to_folder,
)
from fvq.models import Tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    Tokenizer.from_config(TOKENIZER).eval().save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    Tokenizer.from_config(TOKENIZER).eval().save_pretrained(root / "other_tokenizer")
    tokenizer = load_model(root / "tokenizer")
    export(tiny_gpt(0), root / "run" / "model", tokenizer.identity)
    export(tiny_gpt(0), root / "bare", None)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "other": load_model(root / "other_tokenizer"),
        "generator": load_generator(root / "run"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# loading and the tokenizer check
def test_load_generator_from_export_run_folder_and_checkpoint(models, tmp_path):
    root, generator = models["root"], models["generator"]
    assert generator.path == root / "run" / "model" and generator.step == 9
    assert generator.tokenizer_identity == models["tokenizer"].identity
    assert load_generator(root / "run" / "model").identity == generator.identity
    # a run that has not finished: its newest checkpoint, EMA weights when kept (what the export would hold)
    trained, ema = tiny_gpt(5), tiny_gpt(0)
    state = {
        "step": 40,
        "config": {"task": "generator", "model": {"dim": 32, "n_layer": 2, "n_head": 2, "token_dropout_prob": 0.0,
                   "resid_dropout_prob": 0.0, "ffn_dropout_prob": 0.0}, "num_classes": None},
        "model": trained.state_dict(),
        "ema": ema.state_dict(),
        "generator": {"data": {"vocab_size": 32, "grid": list(GRID), "num_classes": CLASSES,
                               "model_identity": models["tokenizer"].identity}},
    }  # fmt: skip
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "run" / "checkpoints" / "step_00000040.pt")
    loaded = load_generator(tmp_path / "run")
    assert loaded.from_checkpoint and loaded.step == 40 and loaded.weights == "ema"
    assert loaded.identity == generator.identity  # same weights and architecture as the export
    assert loaded.tokenizer_identity == models["tokenizer"].identity
    del state["ema"]
    torch.save(state, tmp_path / "run" / "checkpoints" / "step_00000050.pt")
    assert load_generator(tmp_path / "run").weights == "trained"


def test_load_generator_refuses_tokenizers(models):
    with pytest.raises(ValueError, match="does not describe a generator"):
        load_generator(models["root"] / "tokenizer")


def test_tokenizer_check(models):
    generator, tokenizer, other = models["generator"], models["tokenizer"], models["other"]
    assert check_generator_tokenizer(generator, tokenizer).grid == GRID
    with pytest.raises(ForeignGeneratorError) as info:
        check_generator_tokenizer(generator, other)
    assert tokenizer.identity in str(info.value) and other.identity in str(info.value)
    check_generator_tokenizer(generator, other, force=True)
    bare = load_generator(models["root"] / "bare")
    with pytest.raises(ForeignGeneratorError, match="records no tokenizer identity"):
        check_generator_tokenizer(bare, tokenizer)
    check_generator_tokenizer(bare, tokenizer, force=True)
    with pytest.raises(ValueError, match="64 token ids but the tokenizer .* has 32 codes"):
        check_generator_tokenizer(tiny_gpt(0, vocab_size=64), tokenizer, force=True)


# ---------------------------------------------------------------------------------------------------------------------
# images in memory
def test_images_do_not_depend_on_the_batch_size(models):
    generator, tokenizer = models["generator"], models["tokenizer"]
    classes = [0, 4, 2, 2, 1, 3, 0, 4]
    options = {"cfg_scale": 1.5, "seed": 7, "top_k": 20}
    images = {b: generate_images(generator, tokenizer, classes, batch_size=b, **options) for b in (1, 3, 8)}
    assert images[8].shape == (8, 3, 16, 16) and images[8].dtype == torch.float32
    assert images[8].min() >= -1 and images[8].max() <= 1
    assert torch.equal(images[1], images[8]) and torch.equal(images[3], images[8])
    tail = generate_images(generator, tokenizer, classes[5:], sample_offset=5, batch_size=2, **options)
    assert torch.equal(tail, images[8][5:])
    assert not torch.equal(generate_images(generator, tokenizer, classes, seed=8, cfg_scale=1.5), images[8])


def test_generate_images_refusals(models):
    generator, tokenizer = models["generator"], models["tokenizer"]
    with pytest.raises(ValueError, match=r"class ids \[5\] are outside the generator's 5 classes"):
        generate_images(generator, tokenizer, [0, 5])
    no_null = LoadedGenerator(tiny_gpt(0, class_dropout_prob=0.0), generator.path, generator.tokenizer_record)
    with pytest.raises(ValueError, match="needs the null class"):
        generate_images(no_null, tokenizer, [0], cfg_scale=2.0)
    generate_images(no_null, tokenizer, [0], cfg_scale=2.0, cfg_schedule="interval", cfg_interval=(0.0, 0.0))
    with pytest.raises(ForeignGeneratorError):
        generate_images(generator, models["other"], [0])
    with pytest.raises(ValueError, match="top_p"):
        generate_images(generator, tokenizer, [0], top_p=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# class plans
def test_uniform_classes_are_a_function_of_seed_and_index():
    plan = plan_classes(1000, num_samples=20_000, seed=3)
    assert plan.mode == "uniform" and plan.labels.dtype == np.int64 and plan.num_samples == 20_000
    assert plan.labels.min() >= 0 and plan.labels.max() < 1000
    assert np.array_equal(plan_classes(1000, num_samples=500, seed=3).labels, plan.labels[:500])
    assert not np.array_equal(plan_classes(1000, num_samples=500, seed=4).labels, plan.labels[:500])
    counts = np.bincount(plan.labels, minlength=1000)
    assert counts.sum() == 20_000 and 3 <= counts.min() and counts.max() <= 45  # 20 +- 5 sigma


def test_per_class_and_listed_classes():
    plan = plan_classes(4, per_class=3)
    assert plan.labels.tolist() == [0, 1, 2, 3] * 3 and plan.class_counts() == [3, 3, 3, 3]
    listed = plan_classes(4, class_ids=[3, 1, 3])
    assert listed.mode == "list" and listed.labels.tolist() == [3, 1, 3] and listed.class_counts() == [0, 1, 0, 2]
    assert plan_classes(4, class_ids=[2, 0], per_class=2).labels.tolist() == [2, 0, 2, 0]
    with pytest.raises(ValueError, match=r"class ids \[4, 7\] are outside the generator's 4 classes"):
        plan_classes(4, class_ids=[7, 1, 4])
    with pytest.raises(ValueError, match="not both"):
        plan_classes(4, num_samples=3, per_class=2)
    with pytest.raises(ValueError, match="choose the classes"):
        plan_classes(4)
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        plan_classes(4, per_class=0)


# ---------------------------------------------------------------------------------------------------------------------
# the .npz and the sample folder
def test_pack_npz_streams_pngs_into_the_adm_layout(tmp_path):
    from fvq.evaluation.generation import open_samples

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    files = []
    for i, array in enumerate(arrays):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(files[-1])
    path = pack_npz(tmp_path / "s.npz", files, np.array([4, 0, 1, 1, 2]), (8, 6))
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], arrays) and data["labels"].tolist() == [4, 0, 1, 1, 2]
    samples = open_samples(path)  # fvq eval-gen's reader: memory-mapped, labels found
    assert samples.num_images == 5 and samples.image_size == (8, 6) and samples.labels.tolist() == [4, 0, 1, 1, 2]
    assert torch.equal(
        torch.cat(list(samples.batches(0, 5, batch_size=2))), torch.from_numpy(arrays).permute(0, 3, 1, 2)
    )
    with pytest.raises(ValueError, match="is 8x6, expected 6x8"):
        pack_npz(tmp_path / "t.npz", files[:2], np.array([0, 1]), (6, 8))
    assert not (tmp_path / "t.npz").exists()


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_sample_folder_resumes_and_refuses_other_runs(models, tmp_path, monkeypatch):
    generator, tokenizer = models["generator"], models["tokenizer"]
    plan = plan_classes(CLASSES, num_samples=7, seed=2)
    options = SamplingOptions(cfg_scale=1.5, seed=2)
    full = sample_to_folder(generator, tokenizer, tmp_path / "full", plan, options, batch_size=4, write_npz=True)
    assert full.generated == 7 and full.reused == 0
    names = [sample_name(i, int(c)) for i, c in enumerate(plan.labels)]
    expected = {n: (tmp_path / "full" / "images" / n).read_bytes() for n in names}
    assert sorted(os.listdir(tmp_path / "full" / "images")) == sorted(names)

    # an interrupted run: the writer fails after two batches, leaving the record and some PNGs
    real = generate_module.write_images
    calls = []

    def failing(images, file_names, out_dir):
        calls.append(len(file_names))
        if len(calls) > 2:
            raise RuntimeError("interrupted")
        return real(images, file_names, out_dir)

    monkeypatch.setattr(generate_module, "write_images", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        sample_to_folder(generator, tokenizer, tmp_path / "cut", plan, options, batch_size=3, write_npz=True)
    monkeypatch.setattr(generate_module, "write_images", real)
    record = json.loads((tmp_path / "cut" / "sample_config.json").read_text())
    assert record["status"] == "incomplete" and len(os.listdir(tmp_path / "cut" / "images")) == 6
    (tmp_path / "cut" / "images" / names[4]).write_bytes(b"\x89PNG truncated")  # a damaged file is redone
    resumed = sample_to_folder(generator, tokenizer, tmp_path / "cut", plan, options, batch_size=2, write_npz=True)
    assert resumed.generated == 2 and resumed.reused == 5
    assert {n: (tmp_path / "cut" / "images" / n).read_bytes() for n in names} == expected
    with np.load(tmp_path / "cut" / "samples.npz") as cut, np.load(tmp_path / "full" / "samples.npz") as ref:
        assert np.array_equal(cut["arr_0"], ref["arr_0"]) and np.array_equal(cut["labels"], plan.labels)
    again = sample_to_folder(generator, tokenizer, tmp_path / "cut", plan, options, write_npz=True)
    assert again.generated == 0 and again.reused == 7

    # other settings, another tokenizer, a folder of unknown samples: refused, nothing written
    (tmp_path / "stray" / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "stray" / "images" / "000000_c0.png")
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match="holds samples of another run .*seed: 2 there vs 3 now"):
        sample_to_folder(generator, tokenizer, tmp_path / "cut", plan, SamplingOptions(cfg_scale=1.5, seed=3))
    other_plan = plan_classes(CLASSES, num_samples=8, seed=2)
    with pytest.raises(ValueError, match="num_samples: 7 there vs 8 now"):
        sample_to_folder(generator, tokenizer, tmp_path / "cut", other_plan, options)
    with pytest.raises(ForeignGeneratorError):
        sample_to_folder(generator, models["other"], tmp_path / "new", plan, options)
    no_null = LoadedGenerator(tiny_gpt(0, class_dropout_prob=0.0), generator.path, generator.tokenizer_record)
    with pytest.raises(ValueError, match="needs the null class"):
        sample_to_folder(no_null, tokenizer, tmp_path / "new", plan, options)
    with pytest.raises(ValueError, match="class plan is for 4 classes"):
        sample_to_folder(generator, tokenizer, tmp_path / "new", plan_classes(4, per_class=1), options)
    with pytest.raises(ValueError, match="no sample_config.json"):
        sample_to_folder(generator, tokenizer, tmp_path / "stray", plan, options)
    assert _listing(tmp_path) == before


def test_npz_only(models, tmp_path):
    plan = ClassPlan(np.array([1, 1, 0]), CLASSES, "list", class_ids=(1, 1, 0))
    options = SamplingOptions(seed=5, temperature=0.5)
    report = sample_to_folder(
        models["generator"], models["tokenizer"], tmp_path, plan, options, write_npz=True, keep_png=False
    )
    assert report.images_dir is None and not (tmp_path / "images").exists()
    expected = generate_images(models["generator"], models["tokenizer"], [1, 1, 0], seed=5, temperature=0.5)
    with np.load(tmp_path / "samples.npz") as data:
        as_uint8 = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)
    from fvq.data.transforms import to_uint8_half_even

    assert torch.equal(as_uint8, torch.stack([to_uint8_half_even(x) for x in expected]))
    assert json.loads((tmp_path / "labels.json").read_text()) == [1, 1, 0]
    again = sample_to_folder(
        models["generator"], models["tokenizer"], tmp_path, plan, options, write_npz=True, keep_png=False
    )
    assert again.generated == 0
    with pytest.raises(ValueError, match="keep_png=False needs write_npz=True"):
        sample_to_folder(models["generator"], models["tokenizer"], tmp_path / "x", plan, options, keep_png=False)
