#!/usr/bin/env python
"""Class-conditional generation over fvq tokens on a CPU, end to end with fvq's own commands (``make demo-gen``).

The seven embedded scikit-image photos are the classes (class = source photo, ids in sorted name order). Each photo is
split by region: crops of the training set lie in its left three quarters, held-out crops in its right-most quarter,
so no held-out pixel is ever trained on, neither by the tokenizer nor by the generator. Stages, each timed::

    python scripts/generation_demo.py --out runs/gen_demo

    1. crops      OUT/crops/{train,val}/{photo}/{i:05d}.png, drawn from (seed, split, class, i); OUT/crops/split.json
    2. tokenizer  fvq train tiny_fvq_gen --out OUT/tokenizer data.path=OUT/crops
                  (or --tokenizer RUN: reuse a tokenizer, e.g. runs/demo)
    3. tokens     fvq encode OUT/crops/train --model OUT/tokenizer --out OUT/tokens/train --labels subfolders \
                      --views flip
                  fvq encode OUT/crops/val   --model OUT/tokenizer --out OUT/tokens/val   --labels subfolders
    4. generator  fvq train gpt_demo_c2i --out OUT/gpt tokens=OUT/tokens/train val_tokens=OUT/tokens/val
    5. samples    fvq sample OUT/gpt --tokenizer OUT/tokenizer --out OUT/samples/cfg_S --per-class N --cfg-scale S
    6. measures   held-out bits per token against the baselines (OUT/gpt/metrics.json); nearest-class accuracy of the
                  samples per guidance scale; sampling speed with and without the KV cache; figures;
                  OUT/summary.json and OUT/summary.md

The commands run in this process through :func:`fvq.cli.main` (the same argument lists ``fvq`` parses) and are
printed as shell lines first, so the run shows the commands to type. ``--stages`` runs some stages only, reusing
the outputs of the others (e.g. ``--stages samples,measures`` after changing the guidance scales).

How samples are scored. Each sample is assigned the class that explains it best under per-class models, fitted
once on the held-out crops (the right-most quarters, never trained on) and once on the training crops (what the
models trained on):

* codes: the sample's PNG is encoded by the tokenizer and its 64 codes scored under each class's code histogram
  (``p_c(v) = (n_c(v) + 1) / (n_c + V)``, counted over the region's stored tokens); the class of highest
  log-likelihood wins (the histogram nearest in cross-entropy).
* colours: the same over the pixels' colours quantised to 8 x 8 x 8 bins, counted over the region's crops.

The same classifiers applied to real crops of each region give the references; chance is 1 / classes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

STAGES = ("crops", "tokenizer", "tokens", "generator", "samples", "measures")
SPLITS = ("train", "val")
COLOUR_BINS = 8  # per channel: 512 colour bins


# ---------------------------------------------------------------------------------------------------------------------
# 1. crops
@dataclass(frozen=True)
class CropSpec:
    """How the labelled crops are cut.

    Attributes:
        image_size: Crop side in pixels.
        base_size: Each crop comes from its photo resized to a short side drawn from ``[base_size,
            round(1.25 * base_size)]`` (a crop spans about ``image_size / base_size`` of the short side).
        held_out_fraction: The right-most fraction of each photo's width that only held-out crops come from.
        gap: Pixels (at the crop's scale) between the training crops and the held-out region, so that the resize
            filter does not carry held-out pixels into training crops either.
        seed: Crop ``i`` of split ``s`` and class ``c`` is drawn from ``sample_rng(seed, s, c, i)``.
    """

    image_size: int = 32
    base_size: int = 192
    held_out_fraction: float = 0.25
    gap: int = 4
    seed: int = 0

    def short_sides(self) -> range:
        return range(self.base_size, round(1.25 * self.base_size) + 1)


def crop_box(spec: CropSpec, split: str, width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
    """``(left, top)`` of a crop of ``split`` in a ``width x height`` resized photo.

    Training crops lie entirely left of ``(1 - held_out_fraction) * width - gap``, held-out crops entirely right of
    ``(1 - held_out_fraction) * width``: at every scale, in the photo's own coordinates, the two never overlap.
    """
    size = spec.image_size
    boundary = (1.0 - spec.held_out_fraction) * width
    if split == "train":
        low, high = 0, math.floor(boundary) - spec.gap - size
    else:
        low, high = math.ceil(boundary), width - size
    if high < low or height < size:
        raise ValueError(
            f"a {size} px {split} crop does not fit in a {width}x{height} photo with held_out_fraction="
            f"{spec.held_out_fraction}; raise base_size or change held_out_fraction"
        )
    return int(rng.integers(low, high + 1)), int(rng.integers(0, height - size + 1))


def write_crops(out_dir: Path, spec: CropSpec, photos: Sequence[str], per_class: dict[str, int]) -> dict[str, Any]:
    """Write ``out_dir/{split}/{photo}/{i:05d}.png`` and ``out_dir/split.json`` (what was cut and how).

    Args:
        out_dir: The crops folder (an ImageNet-style layout per split).
        spec: The geometry.
        photos: Embedded photo names, one class each (ids follow sorted names, as ``--labels subfolders`` numbers them).
        per_class: Crops per class of each split, e.g. ``{"train": 2000, "val": 256}``.
    """
    from fvq.data.embedded import PHOTOS, load_photo
    from fvq.data.transforms import resize_short_side, sample_rng

    names = sorted(photos)
    record: dict[str, Any] = {
        "classes": names,
        "spec": spec.__dict__,
        "per_class": dict(per_class),
        "rule": "train crops: left edge + size <= (1 - held_out_fraction) * W - gap; val crops: left edge >= "
        "(1 - held_out_fraction) * W; W the width of the photo resized to the crop's short side",
        "photos": {},
    }
    for label, name in enumerate(names):
        photo = load_photo(name)
        if photo is None:
            raise FileNotFoundError(f"embedded photo {name} is missing from this scikit-image install")
        cache_side = 2 * spec.base_size - 1
        if min(photo.size) > cache_side:  # as EmbeddedPhotos: shrink once, then resize to each drawn short side
            photo = resize_short_side(photo, cache_side)
        resized: dict[int, Image.Image] = {}
        for split_index, split in enumerate(SPLITS):
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split]):
                rng = sample_rng(spec.seed, split_index, label, i)
                short = int(rng.integers(spec.short_sides().start, spec.short_sides().stop))
                image = resized.get(short)
                if image is None:
                    image = resized[short] = resize_short_side(photo, short)
                left, top = crop_box(spec, split, *image.size, rng)
                image.crop((left, top, left + spec.image_size, top + spec.image_size)).save(folder / f"{i:05d}.png")
        record["photos"][name] = {"label": label, "size": list(PHOTOS[name].size), "credit": PHOTOS[name].credit}
    (out_dir / "split.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------------------------------
# running fvq's commands
def fvq(argv: list[str], log: list[dict[str, Any]]) -> float:
    """Run ``fvq ARGV`` in this process (:func:`fvq.cli.main`), printed first as a shell line; returns its seconds."""
    from fvq.cli import main

    line = "fvq " + " ".join(shlex.quote(a) for a in argv)
    print(f"\n$ {line}", flush=True)
    started = time.perf_counter()
    code = main(list(argv))
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"`{line}` exited with {code}")
    log.append({"command": line, "seconds": round(seconds, 2)})
    return seconds


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# 6. measures
def class_log_probs(counts: np.ndarray) -> np.ndarray:
    """``(C, V)`` Laplace-smoothed log-probabilities ``log((n_c(v) + 1) / (n_c + V))`` of ``(C, V)`` counts."""
    return np.log((counts + 1.0) / (counts.sum(axis=1, keepdims=True) + counts.shape[1]))


def histogram_counts(values: np.ndarray, labels: np.ndarray, num_classes: int, bins: int) -> np.ndarray:
    """``(C, bins)`` counts of ``values (N, L)`` (ints in ``[0, bins)``) per class ``labels (N,)``."""
    counts = np.zeros((num_classes, bins), dtype=np.float64)
    for c in range(num_classes):
        counts[c] = np.bincount(values[labels == c].reshape(-1), minlength=bins)
    return counts


def nearest_class(values: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """``(N,)`` the class maximising ``sum_l log p_c(values[n, l])`` for ``values (N, L)``, ``log_probs (C, bins)``."""
    bins = log_probs.shape[1]
    per_item = np.stack([np.bincount(v, minlength=bins) for v in values]).astype(np.float64)  # (N, bins)
    return (per_item @ log_probs.T).argmax(axis=1)  # (N,)


def colour_bins(images: np.ndarray) -> np.ndarray:
    """``(N, H * W)`` colour bin of each pixel of ``images (N, H, W, 3)`` uint8 (``COLOUR_BINS`` per channel)."""
    q = images.astype(np.int64) * COLOUR_BINS // 256  # (N, H, W, 3)
    return ((q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]).reshape(len(images), -1)


def read_pngs(paths: Sequence[Path]) -> np.ndarray:
    """``(N, H, W, 3)`` uint8."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def crop_files(
    crops: Path, split: str, names: Sequence[str], limit: int | None = None
) -> tuple[list[Path], np.ndarray]:
    """The crop PNGs of ``split`` (the first ``limit`` per class) and their labels."""
    paths, labels = [], []
    for label, name in enumerate(names):
        files = sorted((crops / split / name).glob("*.png"))[:limit]
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def encode_images(tokenizer: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``(N, h * w)`` codes of ``images (N, H, W, 3)`` uint8, as ``fvq encode`` reads a PNG (``v / 127.5 - 1``)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(tokenizer.encode(x).reshape(x.shape[0], -1).numpy())  # (B, h * w)
    return np.concatenate(out)


def load_samples(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The PNGs ``fvq sample`` wrote (by sample index) and their classes."""
    labels = np.asarray(read_json(folder / "labels.json"), dtype=np.int64)  # (N,) the class of sample i
    paths = sorted((folder / "images").glob("*.png"))
    if len(paths) != len(labels):
        raise ValueError(f"{folder}: {len(paths)} PNGs but {len(labels)} labels")
    return paths, labels


@torch.no_grad()
def time_generation(model: Any, classes: torch.Tensor, *, cfg_scale: float, use_cache: bool, repeats: int) -> dict:
    """Best wall time of ``repeats`` :func:`fvq.generation.generate` calls; tokens/s counts the images' tokens."""
    from fvq.generation import generate

    times, tokens = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = generate(model, classes, cfg_scale=cfg_scale, seed=0, use_cache=use_cache)
        times.append(time.perf_counter() - started)
    best = min(times)
    n = int(classes.shape[0])
    return {
        "use_cache": use_cache,
        "images": n,
        "seconds_best": best,
        "seconds_all": times,
        "images_per_s": n / best,
        "tokens_per_s": n * model.seq_len / best,
        "tokens": tokens,
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def grid_figure(rows: list[list[np.ndarray]], row_names: list[str], col_names: list[str], path: Path) -> None:
    """A figure of panels (each a ``(H, W, 3)`` uint8 tile of images), rows = classes, columns = conditions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = len(rows), len(col_names)
    tile_h, tile_w = rows[0][0].shape[:2]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(ncols * tile_w / 48 + 1.2, nrows * tile_h / 48 + 0.4), squeeze=False
    )
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.imshow(rows[r][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_names[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_names[r], fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile(images: np.ndarray, ncol: int, pad: int = 1) -> np.ndarray:
    """``(k, H, W, 3)`` uint8 images tiled ``ncol`` per row with white padding."""
    k, h, w, _ = images.shape
    nrow = math.ceil(k / ncol)
    canvas = np.full((nrow * (h + pad) - pad, ncol * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(k):
        r, c = divmod(i, ncol)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[i]
    return canvas


def split_figure(crops: Path, spec: CropSpec, names: Sequence[str], path: Path) -> None:
    """Each photo at the crops' base scale with its held-out region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvq.data.embedded import load_photo
    from fvq.data.transforms import resize_short_side

    fig, axes = plt.subplots(1, len(names), figsize=(1.7 * len(names), 1.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        photo = resize_short_side(load_photo(name), spec.base_size)
        w, h = photo.size
        ax.imshow(np.asarray(photo))
        boundary = (1.0 - spec.held_out_fraction) * w
        ax.axvspan(boundary, w, color="red", alpha=0.35, lw=0)
        ax.axvline(boundary - spec.gap, color="white", lw=0.8, ls="--")
        ax.add_patch(plt.Rectangle((4, 4), spec.image_size, spec.image_size, fill=False, ec="yellow", lw=1))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bits_figure(run: Path, path: Path) -> None:
    """Training loss and held-out bits per token over steps, with the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train/bits_per_token"]) for r in records if "train/bits_per_token" in r]
    val = [(r["step"], r["val/bits_per_token"]) for r in records if "val/bits_per_token" in r]
    base = next(r for r in reversed(records) if "val/class_unigram_bits" in r)
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="training batches")
    ax.plot(*zip(*val), "o-", label="held-out (right-most quarters)")
    for key, style, label in (
        ("val/uniform_bits", ":", "uniform, log2 K"),
        ("val/unigram_bits", "-.", "unigram"),
        ("val/class_unigram_bits", "--", "class-conditional unigram"),
    ):
        ax.axhline(base[key], ls=style, color="gray", lw=1)
        ax.text(0, base[key], f" {label} {base[key]:.2f}", va="bottom", fontsize=7, color="dimgray")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(args: argparse.Namespace, out: Path, tokenizer_path: Path, timings: dict[str, float]) -> dict[str, Any]:
    """Stage 6: everything the summary reports, from the files the commands wrote."""
    from fvq.generation import GPT
    from fvq.inference.loading import load_model

    crops = out / "crops"
    split = read_json(crops / "split.json")
    names = split["classes"]
    num_classes = len(names)
    metrics = read_json(out / "gpt" / "metrics.json")
    bits = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
    tokenizer = load_model(tokenizer_path).tokenizer.eval()

    # per-class models of each region: code histograms (the token stores, every view) and colour histograms
    from fvq.data.tokens import TokenStore

    def store_codes(path: Path) -> tuple[np.ndarray, np.ndarray]:
        """``(N * views, T)`` codes of every stored view and their ``(N * views,)`` labels."""
        store = TokenStore(path)
        codes = np.concatenate([np.asarray(store.tokens(k)) for k in range(len(store.shards))])  # (N, V, h, w)
        views = codes.shape[1]
        return codes.reshape(-1, codes.shape[2] * codes.shape[3]).astype(np.int64), np.repeat(store.labels, views)

    val_store = TokenStore(out / "tokens" / "val")
    vocab = int(val_store.codebook_size)
    images_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    models: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for region, split_name in (("held-out", "val"), ("training", "train")):
        codes, code_labels = store_codes(out / "tokens" / split_name)
        paths, labels = crop_files(crops, split_name, names)
        images_of[region] = (read_pngs(paths), labels)
        models[region] = (
            class_log_probs(histogram_counts(codes, code_labels, num_classes, vocab)),
            class_log_probs(histogram_counts(colour_bins(images_of[region][0]), labels, num_classes, COLOUR_BINS**3)),
        )

    def score(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Accuracy of each classifier (fitted on each region, by codes and by colours) on ``images``."""
        codes = encode_images(tokenizer, images)  # (N, T)
        bins = colour_bins(images)  # (N, H * W)
        result: dict[str, Any] = {"n": int(len(labels))}
        for region, (code_model, colour_model) in models.items():
            for kind, predicted in (
                ("codes", nearest_class(codes, code_model)),
                ("colours", nearest_class(bins, colour_model)),
            ):
                key = f"{region} fit, {kind}"
                result[key] = float((predicted == labels).mean())
                result.setdefault("per_class", {})[key] = {
                    names[c]: float((predicted[labels == c] == c).mean()) for c in range(num_classes)
                }
        return result

    # real crops of each region (the first samples_per_class of each class), then the samples of each guidance scale
    n = args.samples_per_class
    accuracy: dict[str, Any] = {}
    for region in ("training", "held-out"):
        images, labels = images_of[region]
        keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(num_classes)])
        accuracy[f"real {region}-region crops"] = score(images[keep], labels[keep])
    samples: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for scale in args.cfg_scales:
        paths, labels = load_samples(out / "samples" / f"cfg_{scale:g}")
        samples[scale] = (read_pngs(paths), labels)
        accuracy[f"cfg {scale:g}"] = score(*samples[scale])
    train_images, train_labels = images_of["training"]

    # sampling speed, with and without the KV cache, on the demo model
    model = GPT.from_pretrained(out / "gpt" / "model").eval()
    classes = torch.arange(args.speed_batch) % num_classes
    speed = {}
    for scale in sorted({1.0, args.speed_cfg}):
        cached = time_generation(model, classes, cfg_scale=scale, use_cache=True, repeats=args.speed_repeats)
        full = time_generation(model, classes, cfg_scale=scale, use_cache=False, repeats=args.speed_repeats)
        same = bool(torch.equal(cached.pop("tokens"), full.pop("tokens")))
        speed[f"cfg {scale:g}"] = {
            "kv_cache": cached,
            "recompute": full,
            "speedup": full["seconds_best"] / cached["seconds_best"],
            "same_tokens": same,
        }

    # figures: classes x guidance scales beside real crops; the split; bits per token over training
    figures = Path(args.figures) if args.figures else out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    k = args.figure_per_cell
    rows = []
    for c in range(num_classes):
        real = train_images[train_labels == c][:k]
        row = [tile(real, ncol=math.ceil(k / 2))]
        for scale in args.cfg_scales:
            images, labels = samples[scale]
            row.append(tile(images[labels == c][:k], ncol=math.ceil(k / 2)))
        rows.append(row)
    grid_path = figures / "gen_cfg_grid.png"
    grid_figure(rows, names, ["real crops"] + [f"CFG {s:g}" for s in args.cfg_scales], grid_path)
    spec = CropSpec(**split["spec"])
    split_path = figures / "gen_split.png"
    split_figure(crops, spec, names, split_path)
    bits_path = figures / "gen_bits.png"
    bits_figure(out / "gpt", bits_path)

    return {
        "classes": names,
        "tokenizer": str(tokenizer_path),
        "codebook_size": vocab,
        "grid": list(val_store.grid),
        "classifiers": {
            "codes": "the class c maximising sum_t log p_c(code_t) over the image's codes (the tokenizer's encoding "
            "of its PNG), p_c(v) = (n_c(v) + 1) / (n_c + V) counted over the region's stored tokens (every view)",
            "colours": f"the same over the pixels' colours in {COLOUR_BINS}^3 bins, counted over the region's crops",
            "held-out fit": "fitted on the held-out crops (right-most quarters, never trained on)",
            "training fit": "fitted on the training crops (what the tokenizer and the generator trained on)",
        },
        "crops": {"per_class": split["per_class"], "spec": split["spec"]},
        "held_out": {k: bits[k] for k in sorted(bits) if not isinstance(bits[k], (dict, list))},
        "generator_step": metrics.get("step"),
        "accuracy": accuracy,
        "chance": 1.0 / num_classes,
        "samples_per_class": args.samples_per_class,
        "speed": speed,
        "figures": [str(grid_path), str(split_path), str(bits_path)],
    }


def summary_markdown(result: dict[str, Any]) -> str:
    """The summary as the tables docs/generation.md shows."""
    h = result["held_out"]
    lines = [
        f"CPU: {result['cpu']} ({result['threads']} thread(s)); load average before/after: "
        f"{result['load_before']} / {result['load_after']}",
        "",
        "| held-out tokens | bits per token |",
        "|---|---:|",
        f"| GPT (step {result['generator_step']}) | **{h['bits_per_token']:.3f}** |",
        f"| class-conditional unigram | {h['class_unigram_bits']:.3f} |",
        f"| unigram | {h['unigram_bits']:.3f} |",
        f"| uniform (log2 K) | {h['uniform_bits']:.3f} |",
        "",
        f"top-1 next-token accuracy {h['accuracy']:.1%} on {int(h['tokens']):,} held-out tokens "
        f"({int(h['sequences']):,} crops)",
        "",
        "| images | n | held-out fit: codes | colours | training fit: codes | colours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, a in result["accuracy"].items():
        figures = " | ".join(
            f"{a[f'{r} fit, {k}']:.1%}" for r in ("held-out", "training") for k in ("codes", "colours")
        )
        lines.append(f"| {name} | {a['n']} | {figures} |")
    lines += [
        f"\nchance: {result['chance']:.1%}",
        "",
        "| guidance | path | images/s | tokens/s | speed-up | same tokens |",
    ]
    lines.append("|---|---|---:|---:|---:|---|")
    for name, s in result["speed"].items():
        for path in ("kv_cache", "recompute"):
            r = s[path]
            extra = f"{s['speedup']:.2f}x" if path == "kv_cache" else ""
            same = str(s["same_tokens"]) if path == "kv_cache" else ""
            lines.append(f"| {name} | {path} | {r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | {extra} | {same} |")
    lines += ["", "| stage | wall time |", "|---|---:|"]
    for stage, seconds in result["timings"].items():
        lines.append(f"| {stage} | {seconds:.1f} s |")
    lines.append(f"| total | {sum(result['timings'].values()):.1f} s |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/gen_demo", help="output folder (default runs/gen_demo)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to run (default all: {','.join(STAGES)})")
    parser.add_argument("--tokenizer", help="reuse this tokenizer (run, export or checkpoint) instead of training one")
    parser.add_argument("--photos", default=None, help="embedded photos used as classes (default: all seven)")
    crops = parser.add_argument_group("crops")
    crops.add_argument("--image-size", type=int, default=32)
    crops.add_argument("--base-size", type=int, default=192, help="short side the photos are resized around")
    crops.add_argument("--held-out-fraction", type=float, default=0.25, help="right-most fraction held out")
    crops.add_argument("--train-per-class", type=int, default=2000)
    crops.add_argument("--val-per-class", type=int, default=256)
    crops.add_argument("--seed", type=int, default=0)
    train = parser.add_argument_group("training")
    train.add_argument("--tokenizer-config", default="tiny_fvq_gen")
    train.add_argument("--tokenizer-steps", type=int, default=None, help="default: the config's (500)")
    train.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    train.add_argument("--gpt-config", default="gpt_demo_c2i")
    train.add_argument("--gpt-steps", type=int, default=None, help="default: the config's (800)")
    train.add_argument("--gpt-set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    train.add_argument("--views", default="flip", help="views of the training crops (fvq encode --views)")
    sample = parser.add_argument_group("sampling and measures")
    sample.add_argument("--cfg-scales", type=_float_list, default=[1.0, 2.0, 4.0])
    sample.add_argument("--samples-per-class", type=int, default=64)
    sample.add_argument("--speed-batch", type=int, default=8, help="images per generate() call timed")
    sample.add_argument("--speed-cfg", type=float, default=2.0, help="guidance of the second timed case")
    sample.add_argument("--speed-repeats", type=int, default=3)
    sample.add_argument("--figure-per-cell", type=int, default=4, help="images per class and column in the grid")
    sample.add_argument("--figures", default=None, help="folder of the figures (default OUT/figures)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; stages: {', '.join(STAGES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fvq.data.embedded import PHOTOS

    photos = args.photos.split(",") if args.photos else list(PHOTOS)
    spec = CropSpec(args.image_size, args.base_size, args.held_out_fraction, seed=args.seed)
    tokenizer = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    timings_path = out / "timings.json"
    timings: dict[str, float] = read_json(timings_path) if timings_path.is_file() else {}
    commands_path = out / "commands.json"
    commands_by_stage: dict[str, list[dict[str, Any]]] = read_json(commands_path) if commands_path.is_file() else {}
    commands: list[dict[str, Any]] = []  # the stage in progress's
    load_before = [round(v, 2) for v in os.getloadavg()]

    def timed(stage: str, fn: Any) -> None:
        if stage not in stages:
            return
        print(f"\n== {stage}", flush=True)
        commands.clear()
        started = time.perf_counter()
        fn()
        timings[stage] = round(time.perf_counter() - started, 2)
        commands_by_stage[stage] = list(commands)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        commands_path.write_text(json.dumps(commands_by_stage, indent=2) + "\n")
        print(f"== {stage}: {timings[stage]:.1f} s", flush=True)

    def crops_stage() -> None:
        write_crops(out / "crops", spec, photos, {"train": args.train_per_class, "val": args.val_per_class})

    def tokenizer_stage() -> None:
        if args.tokenizer:
            print(f"reusing the tokenizer {args.tokenizer}")
            return
        n = args.tokenizer_steps
        steps = [] if n is None else [f"max_steps={n}", f"val_every={n}", f"checkpoint_every={n}"]
        fvq(
            [
                "train", args.tokenizer_config, "--out", str(tokenizer), "--overwrite",
                f"data.path={out / 'crops'}", f"data.image_size={args.image_size}", *steps, *args.tokenizer_set,
            ],
            commands,
        )  # fmt: skip

    def tokens_stage() -> None:
        for split in SPLITS:
            views = ["--views", args.views] if split == "train" else []
            fvq(
                [
                    "encode", str(out / "crops" / split), "--model", str(tokenizer),
                    "--out", str(out / "tokens" / split), "--labels", "subfolders", *views,
                    "--overwrite", "--no-progress",
                ],
                commands,
            )  # fmt: skip

    def generator_stage() -> None:
        fvq(
            [
                "train", args.gpt_config, "--out", str(out / "gpt"), "--overwrite",
                f"tokens={out / 'tokens' / 'train'}", f"val_tokens={out / 'tokens' / 'val'}",
                *([] if args.gpt_steps is None else [f"max_steps={args.gpt_steps}"]), *args.gpt_set,
            ],
            commands,
        )  # fmt: skip

    def samples_stage() -> None:
        for scale in args.cfg_scales:
            folder = out / "samples" / f"cfg_{scale:g}"
            if folder.exists():  # a folder of other settings (another generator) is refused: start it afresh
                import shutil

                shutil.rmtree(folder)
            fvq(
                [
                    "sample", str(out / "gpt"), "--tokenizer", str(tokenizer), "--out", str(folder),
                    "--per-class", str(args.samples_per_class), "--cfg-scale", f"{scale:g}", "--seed", "0",
                    "--no-progress",
                ],
                commands,
            )  # fmt: skip

    timed("crops", crops_stage)
    timed("tokenizer", tokenizer_stage)
    timed("tokens", tokens_stage)
    timed("generator", generator_stage)
    timed("samples", samples_stage)
    result: dict[str, Any] = {}

    def measures_stage() -> None:
        result.update(measure(args, out, tokenizer, timings))

    timed("measures", measures_stage)
    if "measures" in stages:
        result.update(
            {
                "cpu": cpu_model(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "load_before": load_before,
                "load_after": [round(v, 2) for v in os.getloadavg()],
                "timings": {s: timings[s] for s in STAGES if s in timings},
                "total_seconds": round(sum(timings.get(s, 0.0) for s in STAGES), 2),
                "commands": {s: commands_by_stage[s] for s in STAGES if s in commands_by_stage},
            }
        )
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "summary.md").write_text(summary_markdown(result))
        print("\n" + summary_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
