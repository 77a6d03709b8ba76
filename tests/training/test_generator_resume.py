"""Generator training through the real ``fvq train``: an interrupted and resumed run is bit-identical to an
uninterrupted one (weights, AdamW, EMA), and the run ends with an exported model that sampling can load."""

from __future__ import annotations

import json

import pytest
import torch
from training.test_generator_data import T, V, random_store, tiny_overrides

from fvq.cli import main
from fvq.generation import GPT
from fvq.runs import latest_checkpoint, load_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _final_state(run):
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    train = random_store(tmp_path / "train", 40, views=10)  # 5 steps per epoch: the run crosses an epoch
    val = random_store(tmp_path / "val", 12, seed=1)
    # EMA, two micro-batches per step and the fvq schedule: everything a resume must restore
    args = tiny_overrides(train, val, ema=0.9, grad_accum_steps=2, schedule="fvq", max_steps=7, **{"optim.lr": 0.1})
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "gpt_tiny_c2i", "--out", str(straight), *args]) == 0
    assert main(["train", "gpt_tiny_c2i", "--out", str(interrupted), "--stop-after", "4", *args]) == 0
    assert _final_state(interrupted)["step"] == 4
    assert not (interrupted / "model").exists()  # exported only when the run reaches its last step
    assert main(["train", "gpt_tiny_c2i", "--out", str(interrupted), "--resume", *args]) == 0

    a, b = _final_state(straight), _final_state(interrupted)
    assert a["step"] == b["step"] == 7
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["model"]["head.weight"].abs().sum() > 0  # it trained
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
        assert not torch.equal(a["ema"][key], a["model"][key]) or a["model"][key].ndim == 1, key
    sa, sb = a["optim_gpt"]["state"], b["optim_gpt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)
    assert a["generator"]["baselines"] == b["generator"]["baselines"]

    metrics = json.loads((straight / "metrics.json").read_text())
    for key in ("val/loss", "val/bits_per_token", "val/accuracy", "val/ema/bits_per_token", "val/uniform_bits"):
        assert key in metrics, key
    assert metrics["val/uniform_bits"] == 5.0 and metrics["val/tokens"] == 12 * T
    assert metrics["val/replicas_in_sync"] == 1.0
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in log)


def test_the_run_exports_its_final_model(tmp_path):
    train, val = random_store(tmp_path / "train", 16), random_store(tmp_path / "val", 8, seed=1)
    run = tmp_path / "run"
    args = tiny_overrides(train, val, ema=0.5, max_steps=2, val_every=0)
    assert main(["train", "gpt_tiny_c2i", "--out", str(run), *args]) == 0
    model = GPT.from_pretrained(run / "model")
    state = _final_state(run)
    assert model.config.vocab_size == V and model.config.grid == (4, 4) and model.config.num_classes == 4
    for name, tensor in model.state_dict().items():  # the EMA weights are exported when an EMA is kept
        assert torch.equal(tensor, state["ema"][name]), name
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["tokenizer"] == {"model_identity": "tokenizer-a", "codebook_size": V, "grid": [4, 4]}
    assert saved["class_names"] == [f"class {c}" for c in range(4)]
    assert saved["training"]["weights"] == "ema" and saved["training"]["step"] == 2
    # a new run over the same folder with --overwrite does not keep the old export
    assert main(["train", "gpt_tiny_c2i", "--out", str(run), "--overwrite", "--stop-after", "1", *args]) == 0
    assert not (run / "model").exists()
