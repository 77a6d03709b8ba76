"""Token data for the generator-training tests: a small file-backed store with the token dataset's interface.

``StandInTokens(path, split=, seed=)`` has the attributes and items of ``fvq.data.tokens.TokenDataset`` (``grid``,
``codebook_size``, ``num_classes``, ``class_names``, ``model_identity``; items ``TokenSample(tokens (T,), label ())``;
``set_epoch`` draws one of a sample's views per epoch as a pure function of ``(seed, epoch, index)``). Tests put it in
place of the real reader with :func:`use_stand_in`, and processes launched by torchrun with :func:`launcher`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import fvq.training.generator_task as generator_task
from fvq.training.generator_task import draw_seed

HERE = Path(__file__).resolve().parent
V, GRID, CLASSES = 32, (4, 4), 4
T = GRID[0] * GRID[1]


class TokenSample(NamedTuple):
    tokens: Tensor
    label: Tensor


class StandInTokens:
    """A token store in one ``.pt`` file: ``tokens`` ``(N, views, T)`` (or ``(N, views, T, c)``), ``labels`` ``(N,)``
    and the layout; ``split="train"`` draws a view per epoch, other splits read view 0."""

    def __init__(self, path: str | Path, *, split: str = "train", seed: int = 0) -> None:
        data = torch.load(path, weights_only=True)
        self.tokens, self.labels = data["tokens"], data["labels"]
        self.grid = tuple(data["grid"])
        self.codebook_size = int(data["codebook_size"])
        self.num_classes = int(data["num_classes"])
        self.class_names = list(data["class_names"])
        self.model_identity = str(data["model_identity"])
        self.split, self.seed, self.epoch = split, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: int) -> TokenSample:
        views = self.tokens.shape[1]
        view = draw_seed(self.seed, self.epoch, index) % views if self.split == "train" and views > 1 else 0
        return TokenSample(self.tokens[index, view].long(), self.labels[index].long())


def write_store(
    path: Path,
    tokens: Tensor,
    labels: Tensor,
    *,
    codebook_size: int = V,
    grid: tuple[int, int] = GRID,
    num_classes: int = CLASSES,
    identity: str = "tokenizer-a",
) -> Path:
    """Write a store: ``tokens`` ``(N, views, T)``, ``labels`` ``(N,)``."""
    torch.save(
        {
            "tokens": tokens,
            "labels": labels,
            "grid": list(grid),
            "codebook_size": codebook_size,
            "num_classes": num_classes,
            "class_names": [f"class {c}" for c in range(num_classes)],
            "model_identity": identity,
        },
        path,
    )
    return path


def random_store(path: Path, n: int, *, views: int = 2, seed: int = 0, **layout) -> Path:
    """Uniformly random tokens and labels."""
    g = torch.Generator().manual_seed(seed)
    vocab, grid = layout.get("codebook_size", V), layout.get("grid", GRID)
    tokens = torch.randint(0, vocab, (n, views, grid[0] * grid[1]), generator=g)
    labels = torch.randint(0, layout.get("num_classes", CLASSES), (n,), generator=g)
    return write_store(path, tokens, labels, **layout)


def structured_store(path: Path, n: int, *, noise: float = 0.1, seed: int = 0) -> Path:
    """Each class has its own fixed sequence of 16 different tokens (so its unigram is 4 bits); a fraction ``noise``
    of the tokens is replaced by random ones. A model that reads the class and the position predicts far better.
    The sequences are the same in every store; ``seed`` draws the labels and the noise."""
    pattern = torch.Generator().manual_seed(1234)
    order = torch.stack([torch.randperm(V, generator=pattern)[:T] for _ in range(CLASSES)])  # (classes, T)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    tokens = order[labels][:, None, :].clone()  # (n, 1, T)
    replace = torch.rand(tokens.shape, generator=g) < noise
    tokens[replace] = torch.randint(0, V, (int(replace.sum()),), generator=g)
    return write_store(path, tokens, labels)


def open_stand_in(path: str | Path, *, split: str, seed: int) -> StandInTokens:
    return StandInTokens(path, split=split, seed=seed)


def use_stand_in(monkeypatch) -> None:
    """Make ``tokens=PATH`` open stand-in stores in this process."""
    monkeypatch.setattr(generator_task, "open_tokens", open_stand_in)


def launcher(directory: Path) -> Path:
    """A script for torchrun that opens stand-in stores, then runs ``fvq`` with its arguments."""
    script = directory / "launch_fvq.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import fvq.training.generator_task as generator_task\n"
        "from test_generator_data import open_stand_in\n"
        "generator_task.open_tokens = open_stand_in\n"
        "from fvq.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    return script


def tiny_overrides(train: Path, val: Path, **extra) -> list[str]:
    """Overrides that shrink gpt_tiny_c2i to a model of width 64, 2 layers, trained for a few steps on CPU."""
    base = {
        "model.preset": "null",
        "model.dim": 64,
        "model.n_layer": 2,
        "model.n_head": 4,
        "tokens": str(train),
        "val_tokens": str(val),
        "global_batch_size": 8,
        "max_steps": 6,
        "epochs": "null",
        "val_every": 3,
        "checkpoint_every": 3,
        "log_every": 1,
        "val_batch_size": 8,
        "val_samples": 12,
        "tensorboard": "false",
        "device": "cpu",
        "precision": "fp32",
        "num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------------------------------------------------
def test_stand_in_has_the_token_dataset_interface(tmp_path):
    store = StandInTokens(random_store(tmp_path / "t.pt", 10, views=3))
    assert len(store) == 10 and store.grid == GRID and store.codebook_size == V and store.num_classes == CLASSES
    sample = store[4]
    assert sample.tokens.shape == (T,) and sample.tokens.dtype == torch.long and sample.label.shape == ()
    views = []
    for epoch in range(6):
        store.set_epoch(epoch)
        views.append(store[4].tokens)
    store.set_epoch(2)
    assert torch.equal(store[4].tokens, views[2])  # a pure function of (seed, epoch, index)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    held_out = StandInTokens(tmp_path / "t.pt", split="val")
    held_out.set_epoch(5)
    assert torch.equal(held_out[4].tokens, held_out.tokens[4, 0])
