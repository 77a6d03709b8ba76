"""Overrides can point a preset at other data without copying it, and validation warns only when it reads training."""

import logging

import pytest

from fvq.data.build import warn_if_validation_reads_training
from fvq.training.config import TrainConfig, config_from_dict, load_config


def _folder(root, name):
    path = root / name
    path.mkdir()
    return path


def test_changing_the_data_type_drops_the_keys_the_new_type_does_not_take(tmp_path, caplog):
    images = _folder(tmp_path, "images")
    with caplog.at_level(logging.WARNING):
        config = load_config("tiny_fvq", ["data.type=folder", f"data.path={images}"])
    assert config.data == {"type": "folder", "image_size": 32, "path": str(images)}  # val_samples dropped
    assert "data.val_samples" in caplog.text and "'folder' does not take" in caplog.text


def test_null_removes_a_key_inside_a_section_and_nulls_a_top_level_field():
    config = load_config("tiny_fvq", ["data.val_samples=null", "val_psnr_images=null"])
    assert "val_samples" not in config.data
    assert config.val_psnr_images is None
    with pytest.raises(ValueError, match="max_steps must not be null"):
        load_config("tiny_fvq", ["max_steps=null"])


def test_a_key_the_type_does_not_take_is_still_refused_when_the_type_is_kept(tmp_path):
    config = load_config("tiny_fvq", ["data.extensions=[.png]"])  # embedded data, a folder-only key
    from fvq.data import build_dataset

    with pytest.raises(ValueError, match="unknown keys \\['extensions'\\]"):
        build_dataset(config.data, split="train")


def test_a_separate_validation_folder_is_not_reported_as_the_training_images(tmp_path, caplog):
    train, val = _folder(tmp_path, "train"), _folder(tmp_path, "val_images")
    with caplog.at_level(logging.WARNING):
        assert not warn_if_validation_reads_training(
            {"type": "folder", "path": str(train)}, {"type": "folder", "path": str(val)}
        )
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):  # one folder for both, without a val subfolder: the real case
        assert warn_if_validation_reads_training(
            {"type": "folder", "path": str(train)}, {"type": "folder", "path": str(train)}
        )
    assert "validation reads the same images as training" in caplog.text
    _folder(train, "val")  # with a val subfolder the same config holds out images
    assert not warn_if_validation_reads_training(
        {"type": "folder", "path": str(train)}, {"type": "folder", "path": str(train)}
    )


def test_the_task_key_selects_the_config_kind_and_unknown_tasks_are_refused():
    assert isinstance(config_from_dict({"max_steps": 3}), TrainConfig)
    assert config_from_dict({"max_steps": 3}).to_dict()["task"] == "tokenizer"
    assert list(config_from_dict({}).to_dict())[:3] == ["task", "model", "quantizer"]  # the kind's fields first
    with pytest.raises(ValueError, match="unknown task 'painter'"):
        config_from_dict({"task": "painter"})
