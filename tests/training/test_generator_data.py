"""Token stores for the generator-training tests: synthetic tokens written in the format ``fvq encode`` writes
(:func:`fvq.data.tokens.write_shard` / :func:`~fvq.data.tokens.write_meta`, no tokenizer), read back through
:class:`fvq.data.tokens.TokenDataset` as ``tokens=PATH`` reads them in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fvq.data.tokens import TokenDataset, ViewSpec, storage_dtype, write_meta, write_shard

V, GRID, CLASSES = 32, (4, 4), 4
T = GRID[0] * GRID[1]
VIEWS = {1: "center", 2: "flip", 10: "tencrop"}


def write_store(
    path: Path,
    tokens: Tensor,
    labels: Tensor,
    *,
    codebook_size: int = V,
    grid: tuple[int, int] = GRID,
    num_classes: int = CLASSES,
    identity: str = "tokenizer-a",
    shard_size: int = 16,
) -> Path:
    """Write a token store: ``tokens`` ``(N, views, T)`` (or ``(N, views, T, c)``: ``c`` codes per position) with
    1, 2 or 10 views, ``labels`` ``(N,)``; shards of ``shard_size`` images."""
    n, views = tokens.shape[:2]
    codes = tokens.shape[3] if tokens.ndim == 4 else 1
    settings = {
        "model_identity": identity,
        "codebook_size": codebook_size,
        "grid": list(grid),
        "codes_per_position": codes,
        "dtype": storage_dtype(codebook_size).name,
        "image_size": 4 * grid[0],
        "protocol": "llamagen",
        "views": VIEWS[views],
        "labels": "subfolders",
        "class_names": [f"class {c}" for c in range(num_classes)],
        "num_inputs": n,
        "shard_size": shard_size,
    }
    assert ViewSpec.parse(settings["views"]).count == views
    path.mkdir(parents=True, exist_ok=True)
    array = tokens.numpy().reshape(n, views, *grid, *((codes,) if codes > 1 else ()))
    entries = []
    for index, start in enumerate(range(0, n, shard_size)):
        part = slice(start, min(n, start + shard_size))
        entries.append(
            write_shard(
                path,
                index,
                tokens=array[part].astype(settings["dtype"]),
                labels=labels[part].numpy(),
                sources=[f"class {int(labels[i])}/{i}.png" for i in range(part.start, part.stop)],
                skipped=[],
                first_input=start,
                inputs=part.stop - part.start,
                settings=settings,
            )
        )
    write_meta(path, settings, entries)
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
def test_written_stores_read_back_as_training_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, V, (20, 2, T), generator=g), torch.randint(0, CLASSES, (20,), generator=g)
    path = write_store(tmp_path / "store", tokens, labels, shard_size=8)  # three shards
    train = TokenDataset(path, split="train", seed=0, require_labels=True)
    assert len(train) == 20 and tuple(train.grid) == GRID and train.codebook_size == V
    assert train.num_classes == CLASSES and train.model_identity == "tokenizer-a" and train.codes_per_position == 1
    seen = []
    for epoch in range(6):
        train.set_epoch(epoch)
        sample = train[13]
        assert sample.tokens.shape == (T,) and int(sample.label) == int(labels[13])
        seen.append(sample.tokens)
    assert all(any(torch.equal(s, tokens[13, v]) for v in range(2)) for s in seen)
    assert any(not torch.equal(seen[0], s) for s in seen[1:])  # views drawn per epoch
    held_out = TokenDataset(path, split="val", seed=0)
    assert all(torch.equal(held_out[i].tokens, tokens[i, 0]) for i in range(20))
    assert np.array_equal(np.asarray([int(held_out[i].label) for i in range(20)]), labels.numpy())
