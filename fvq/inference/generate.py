"""Class-conditional images from a trained generator: its tokens sampled, then decoded by the tokenizer they came from.

* :func:`load_generator` reads a generator export (``config.json`` + ``model.safetensors``, e.g. ``RUN/model``), a
  generator run folder (its ``model/`` export, else its newest checkpoint) or one checkpoint, and returns a
  :class:`LoadedGenerator` that knows which tokenizer made its training tokens.
* :func:`check_generator_tokenizer` refuses a tokenizer other than that one (identities compared; ``force=True``
  overrides) and a tokenizer whose codebook or token layout the generator cannot use (never overridden).
* :func:`generate_images` samples tokens with :func:`fvq.generation.generate` and decodes them: images in memory.
* :func:`sample_to_folder` is the pipeline behind ``fvq sample``: PNGs named by sample index and class, an ADM-layout
  ``samples.npz``, ``labels.json`` and ``sample_config.json``; resumable, and split across ranks under ``torchrun``.

Reproducibility: the tokens of sample ``i`` depend only on ``(seed, i)`` (:func:`fvq.generation.generate`) and each
sample is decoded on its own (a batch of one), so an image does not depend on the batch size, on the number of
processes or on where an interrupted run was resumed. Decoding samples one by one matters: a convolution over a batch
differs from one over a single image in the last bits (about 4e-5 for the VQ-16 decoder on a CPU), enough to move
pixels across a rounding boundary of the 8-bit PNG. The one remaining caveat is the generator's: its logits may
differ in the last bits between batch shapes, which changes a draw only at a near-exact tie.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from fvq.distributed import all_gather_objects, placement
from fvq.generation.gpt import CONFIG_NAME, GPT, GPTConfig, gpt_config
from fvq.generation.layout import TokenLayout, tokens_to_grid
from fvq.generation.sampling import CFG_SCHEDULES, generate, guidance_scale
from fvq.inference.loading import LoadedModel, resolve_checkpoint, resolve_device, weights_digest
from fvq.inference.pipeline import write_images
from fvq.models.tokenizer import Tokenizer
from fvq.runs import EXPORT_DIR, load_checkpoint

__all__ = [
    "IMAGES_DIR",
    "LABELS_NAME",
    "NPZ_NAME",
    "SAMPLE_CONFIG",
    "ClassPlan",
    "ForeignGeneratorError",
    "LoadedGenerator",
    "SampleReport",
    "SamplingOptions",
    "check_generator_tokenizer",
    "generate_images",
    "load_generator",
    "pack_npz",
    "plan_classes",
    "sample_name",
    "sample_to_folder",
]

SAMPLE_CONFIG = "sample_config.json"  # the name fvq eval-gen looks for beside the samples
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
LABELS_NAME = "labels.json"
SAMPLES_FORMAT = "fvq-samples"
SAMPLES_FORMAT_VERSION = 1
# what decides the images; a folder holding samples of other values for any of these belongs to another run
SETTING_KEYS = (
    "generator_identity",
    "tokenizer_identity",
    "image_size",
    "num_samples",
    "num_classes",
    "classes",
    "labels_sha256",
    "seed",
    "cfg_scale",
    "cfg_schedule",
    "cfg_interval",
    "temperature",
    "top_k",
    "top_p",
)


class ForeignGeneratorError(ValueError):
    """The generator was trained on tokens of another tokenizer, or records none (``force=True`` samples anyway)."""


# ---------------------------------------------------------------------------------------------------------------------
# the loaded generator
def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class LoadedGenerator:
    """A generator in eval mode and what it was trained on.

    Attributes:
        model: The :class:`~fvq.generation.gpt.GPT`, in eval mode.
        path: The export folder or the checkpoint file that was read.
        tokenizer_record: What the export or checkpoint records about the tokens it was trained on:
            ``model_identity`` (the tokenizer's :func:`~fvq.inference.loading.model_identity`), ``codebook_size``
            and ``grid``; empty when nothing is recorded (an imported LlamaGen model, a bare ``save_pretrained``).
        class_names: One name per class when recorded, else empty.
        step: Training step of the weights, when recorded.
        weights: ``"ema"`` or ``"trained"`` when recorded.
        from_checkpoint: True when read from a training checkpoint rather than an export.
    """

    model: GPT
    path: Path
    tokenizer_record: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    step: int | None = None
    weights: str | None = None
    from_checkpoint: bool = False

    @classmethod
    def of(cls, generator: GPT | LoadedGenerator) -> LoadedGenerator:
        """A :class:`LoadedGenerator` view of a bare GPT (nothing recorded); a :class:`LoadedGenerator` as it is."""
        if isinstance(generator, LoadedGenerator):
            return generator
        if not isinstance(generator, GPT):
            raise TypeError(f"generator must be an fvq GPT or a LoadedGenerator, got {type(generator).__name__}")
        return cls(model=generator, path=Path("."))

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def tokenizer_identity(self) -> str | None:
        """Identity of the tokenizer whose tokens trained the generator, or ``None`` when not recorded."""
        identity = self.tokenizer_record.get("model_identity")
        return str(identity) if identity else None

    @cached_property
    def identity(self) -> str:
        """``"<weights digest>+<first 16 hex of the config digest>"``: :func:`~fvq.inference.loading.weights_digest`
        of the state dict and the SHA-256 of the architecture (``activation_checkpointing`` left out, as it does not
        change outputs), so a run's checkpoint and its export of the same weights have the same identity."""
        config = self.config.to_dict()
        config.pop("activation_checkpointing", None)
        config_sha = hashlib.sha256(_canonical_json(config).encode()).hexdigest()
        return f"{weights_digest(self.model.state_dict())}+{config_sha[:16]}"

    def describe(self) -> dict[str, Any]:
        """Plain data for ``sample_config.json``."""
        from fvq.generation.gpt import preset_name

        return {
            "path": str(self.path),
            "identity": self.identity,
            "preset": preset_name(self.config),
            "parameters": self.model.num_parameters(),
            "config": self.config.to_dict(),
            "tokenizer": dict(self.tokenizer_record),
            "step": self.step,
            "weights": self.weights,
            "from_checkpoint": self.from_checkpoint,
        }


def _is_generator_folder(path: Path) -> bool:
    if not (path.is_dir() and (path / CONFIG_NAME).is_file()):
        return False
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("type") == "gpt"
    except (json.JSONDecodeError, AttributeError):
        return False


def _load_export(folder: Path, device: torch.device) -> LoadedGenerator:
    model = GPT.from_pretrained(folder, map_location=device)
    data = json.loads((folder / CONFIG_NAME).read_text())
    training = data.get("training") or {}
    step = training.get("step")
    return LoadedGenerator(
        model=model,
        path=folder,
        tokenizer_record=dict(data.get("tokenizer") or {}),
        class_names=[str(n) for n in data.get("class_names") or []],
        step=int(step) if isinstance(step, int) else None,
        weights=training.get("weights"),
    )


def _load_checkpoint(checkpoint: Path, device: torch.device) -> LoadedGenerator:
    state = load_checkpoint(checkpoint, mmap=True)  # tensors stay on disk until copied into the model
    config = state.get("config") if isinstance(state, dict) else None
    data = (state.get("generator") or {}).get("data") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(data, dict) or "model" not in state:
        raise ValueError(
            f"{checkpoint} is not a generator training checkpoint (no 'generator' entry; a tokenizer checkpoint "
            f"goes to --tokenizer / load_model)"
        )
    # the architecture as the generator task builds it: the model section, the vocabulary and grid of the tokens
    shape = dict(config.get("model") or {})
    preset = shape.pop("preset", None)
    num_classes = config.get("num_classes") or data["num_classes"]
    common = {"vocab_size": int(data["vocab_size"]), "grid": tuple(data["grid"]), "num_classes": int(num_classes)}
    gpt = gpt_config(preset, **common, **shape) if preset else GPTConfig(**shape, **common)
    gpt.activation_checkpointing = False
    weights = dict(state["model"])
    ema = state.get("ema")
    if ema:  # the export of a run with an EMA holds the average: sample the same weights
        weights.update(ema)
    with torch.device("meta"):
        model = GPT(gpt)
    model.check_state_dict(weights, source=str(checkpoint))
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, assign=True)
    return LoadedGenerator(
        model=model.eval(),
        path=checkpoint,
        tokenizer_record={
            "model_identity": data.get("model_identity"),
            "codebook_size": int(data["vocab_size"]),
            "grid": list(data["grid"]),
        },
        step=int(state.get("step", 0)),
        weights="ema" if ema else "trained",
        from_checkpoint=True,
    )


def load_generator(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Load a generator from an export folder, a run folder or a training checkpoint.

    Args:
        path: A folder written by :meth:`GPT.save_pretrained` or by a generator run's export (``RUN/model``); a
            generator run folder (its ``model/`` export when the run finished, else its newest
            ``checkpoints/step_*.pt``, EMA weights when kept); or one checkpoint file.
        device: Where to put the model (``"auto"`` picks CUDA when available).

    Returns:
        A :class:`LoadedGenerator` whose model is in eval mode on ``device``.
    """
    path = Path(path)
    device = resolve_device(device)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return _load_export(path, device)  # a folder of another model type is refused by GPT.from_pretrained
    if _is_generator_folder(path / EXPORT_DIR):
        return _load_export(path / EXPORT_DIR, device)
    return _load_checkpoint(resolve_checkpoint(path), device)


# ---------------------------------------------------------------------------------------------------------------------
# generator <-> tokenizer
def check_generator_tokenizer(
    generator: GPT | LoadedGenerator, tokenizer: Tokenizer | LoadedModel, *, force: bool = False
) -> TokenLayout:
    """Check that ``tokenizer`` decodes ``generator``'s tokens.

    Args:
        generator: The generator.
        tokenizer: The tokenizer (a :class:`LoadedModel` from :func:`~fvq.inference.loading.load_model`).
        force: Accept a tokenizer other than the recorded one, or a generator that records none. A codebook size or
            token layout the generator cannot use is refused whatever ``force`` says.

    Raises:
        ForeignGeneratorError: The identities differ, or the generator records none (and ``force`` is False).
        ValueError: The codebook size differs from the generator's vocabulary, or the tokenizer's codes are not one
            code per grid position.

    Returns:
        The :class:`TokenLayout` of the generator's images (its grid) under this tokenizer.
    """
    gen = LoadedGenerator.of(generator)
    loaded = LoadedModel.of(tokenizer)
    h, w = gen.config.grid
    factor = loaded.tokenizer.downsample_factor
    layout = TokenLayout.from_tokenizer(loaded.tokenizer, (h * factor, w * factor))
    if layout.vocab_size != gen.config.vocab_size:
        raise ValueError(
            f"the generator predicts {gen.config.vocab_size} token ids but the tokenizer {loaded.path} has "
            f"{layout.vocab_size} codes: it was trained on another tokenizer's tokens"
        )
    recorded = gen.tokenizer_identity
    if recorded is None and not force:
        raise ForeignGeneratorError(
            f"the generator {gen.path} records no tokenizer identity (an imported or bare save_pretrained model), so "
            f"whether {loaded.path} made its tokens cannot be checked; pass force=True to sample with it anyway"
        )
    if recorded is not None and recorded != loaded.identity and not force:
        raise ForeignGeneratorError(
            f"the generator {gen.path} was trained on tokens of the tokenizer with identity {recorded}, but "
            f"{loaded.path} has identity {loaded.identity}; give the tokenizer it was trained on (or pass force=True)"
        )
    return layout


# ---------------------------------------------------------------------------------------------------------------------
# sampling settings and class plans
def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingOptions:
    """The settings of :func:`fvq.generation.generate` (see there); checked on construction.

    Attributes:
        cfg_scale: Classifier-free guidance scale (1 = none).
        cfg_schedule: ``"constant"``, ``"linear"`` or ``"interval"``.
        cfg_interval: ``(start, end)`` fractions of the sequence guided by ``"interval"``.
        temperature: Softmax temperature (0 = greedy).
        top_k: Keep the k most likely tokens (0 = all).
        top_p: Nucleus threshold (1 = off).
        seed: Seed of the run: sample ``i`` depends only on ``(seed, i)``.
    """

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_number(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        interval = self.cfg_interval
        if (
            not isinstance(interval, (tuple, list))
            or len(interval) != 2
            or not all(_is_number(v) for v in interval)
            or not 0.0 <= interval[0] <= interval[1] <= 1.0
        ):
            raise ValueError(f"cfg_interval must be (start, end) with 0 <= start <= end <= 1, got {interval!r}")
        object.__setattr__(self, "cfg_interval", (float(interval[0]), float(interval[1])))
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def guided(self, seq_len: int) -> bool:
        """Whether any of ``seq_len`` tokens is drawn with guidance (which needs the null class)."""
        return any(
            guidance_scale(t, seq_len, scale=self.cfg_scale, schedule=self.cfg_schedule, interval=self.cfg_interval)
            != 1.0
            for t in range(seq_len)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "cfg_scale": float(self.cfg_scale),
            "cfg_schedule": self.cfg_schedule,
            "cfg_interval": list(self.cfg_interval),
            "temperature": float(self.temperature),
            "top_k": self.top_k,
            "top_p": float(self.top_p),
        }

    def generate_kwargs(self) -> dict[str, Any]:
        d = self.to_dict()
        d["cfg_interval"] = self.cfg_interval
        return d


_MASK64 = (1 << 64) - 1
_CLASS_STREAM = 0x636C617373  # separates the class draws from anything else seeded by the same seed


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of uint64, wrapping arithmetic
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform_classes(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Class of each sample drawn uniformly from ``[0, num_classes)``; class ``i`` is a pure function of
    ``(seed, i)`` (a SplitMix64 hash; modulo bias below ``num_classes / 2**64``).

    Returns:
        ``(num_samples,)`` int64.
    """
    key = _splitmix64(np.array([(seed & _MASK64) ^ _CLASS_STREAM], dtype=np.uint64))
    bits = _splitmix64(np.arange(num_samples, dtype=np.uint64) ^ key)  # (N,)
    return (bits % np.uint64(num_classes)).astype(np.int64)


@dataclass(frozen=True)
class ClassPlan:
    """Which class each sample gets.

    Attributes:
        labels: ``(N,)`` int64, the class of sample ``i``.
        num_classes: Classes of the generator.
        mode: ``"uniform"`` (drawn from the seed), ``"list"`` (the ids given, in order) or ``"per_class"`` (each class
            ``per_class`` times; sample ``i`` gets ``class_ids[i % len(class_ids)]``, so every prefix is balanced).
        per_class: Samples per class in ``"per_class"`` mode.
        class_ids: The ids given (``None``: all classes).
    """

    labels: np.ndarray
    num_classes: int
    mode: str
    per_class: int | None = None
    class_ids: tuple[int, ...] | None = None

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def labels_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.labels, dtype="<i8").tobytes()).hexdigest()

    def class_counts(self) -> list[int]:
        """Samples per class, ``num_classes`` entries."""
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "per_class": self.per_class,
            "class_ids": None if self.class_ids is None else list(self.class_ids),
        }


def plan_classes(
    num_classes: int,
    *,
    num_samples: int | None = None,
    class_ids: Sequence[int] | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> ClassPlan:
    """The classes of a run: ``num_samples`` drawn uniformly from the seed, the ``class_ids`` given, or ``per_class``
    samples of each class (of ``class_ids`` when given, else of all classes; 50 per class x 1,000 classes is the
    50,000 of the FID protocol).

    Args:
        num_classes: Classes of the generator.
        num_samples: Uniformly drawn classes (not with ``class_ids`` or ``per_class``).
        class_ids: Explicit class ids, one sample each (or ``per_class`` each).
        per_class: Samples per class.
        seed: Seed of the uniform draw.

    Raises:
        ValueError: No choice or two exclusive ones, counts below 1, or class ids outside ``[0, num_classes)``.
    """
    if num_samples is not None and (class_ids is not None or per_class is not None):
        raise ValueError("give num_samples (uniformly drawn classes) or class_ids / per_class, not both")
    for name, value in (("num_samples", num_samples), ("per_class", per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_samples is not None:
        return ClassPlan(uniform_classes(num_samples, num_classes, seed), num_classes, "uniform")
    if class_ids is None and per_class is None:
        raise ValueError("choose the classes: num_samples (drawn uniformly), class_ids, or per_class")
    ids = list(range(num_classes)) if class_ids is None else [int(c) for c in class_ids]
    if not ids:
        raise ValueError("class_ids is empty: give at least one class id")
    bad = sorted({c for c in ids if not 0 <= c < num_classes})
    if bad:
        raise ValueError(
            f"class ids {bad[:8]} are outside the generator's {num_classes} classes [0, {num_classes - 1}]"
        )
    given = None if class_ids is None else tuple(ids)
    if per_class is None:
        return ClassPlan(np.asarray(ids, dtype=np.int64), num_classes, "list", class_ids=given)
    labels = np.tile(np.asarray(ids, dtype=np.int64), per_class)  # sample i -> ids[i % len(ids)]
    return ClassPlan(labels, num_classes, "per_class", per_class=per_class, class_ids=given)


# ---------------------------------------------------------------------------------------------------------------------
# images in memory
def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_ready(gen: LoadedGenerator, options: SamplingOptions, labels: np.ndarray | Tensor) -> None:
    """The checks that need no tokenizer: guidance needs the null class, labels within the classes."""
    config = gen.config
    if options.guided(config.seq_len) and not config.has_null_class:
        raise ValueError(
            f"classifier-free guidance (cfg_scale={options.cfg_scale}) needs the null class, but this generator was "
            f"trained with class_dropout_prob = 0 and has none; sample with cfg_scale=1"
        )
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        bad = sorted({int(c) for c in labels[(labels < 0) | (labels >= config.num_classes)]})
        raise ValueError(
            f"class ids {bad[:8]} are outside the generator's {config.num_classes} classes "
            f"[0, {config.num_classes - 1}]"
        )


def _sample_batch(
    model: GPT, tokenizer: Tokenizer, classes: Tensor, options: SamplingOptions, sample_offset: int
) -> Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1], float32 on the CPU, of samples ``sample_offset .. + B - 1``."""
    tokens = generate(
        model, classes.to(model.device), sample_offset=sample_offset, **options.generate_kwargs()
    )  # (B, T)
    indices = tokens_to_grid(tokens, model.config.grid).to(_device_of(tokenizer))  # (B, h, w)
    with torch.inference_mode():
        # one image per decoder pass: batched convolutions differ in the last bits, which would tie a PNG to the
        # batch it was decoded in
        images = torch.cat([tokenizer.decode(indices[i : i + 1]) for i in range(indices.shape[0])])  # (B, 3, H, W)
    return images.clamp(-1, 1).float().cpu()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def generate_images(
    generator: GPT | LoadedGenerator,
    tokenizer: Tokenizer | LoadedModel,
    classes: Tensor | Sequence[int],
    *,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    sample_offset: int = 0,
    batch_size: int = 32,
    force: bool = False,
    progress: bool = False,
) -> Tensor:
    """Sample one image per class label: tokens from the generator, decoded by the tokenizer.

    Args:
        generator: From :func:`load_generator` (or a bare GPT, which records no tokenizer: needs ``force``).
        tokenizer: The tokenizer whose tokens trained the generator (:func:`~fvq.inference.loading.load_model`).
        classes: ``(N,)`` class ids in ``[0, num_classes)``.
        cfg_scale, cfg_schedule, cfg_interval, temperature, top_k, top_p, seed: See
            :func:`fvq.generation.generate` (and :class:`SamplingOptions`).
        sample_offset: Global index of the first sample: image ``i`` is sample ``sample_offset + i`` of the run.
        batch_size: Samples per generator call (the guided batch is twice as large); does not change the images.
        force: Sample with a tokenizer other than the recorded one (see :func:`check_generator_tokenizer`).
        progress: Show a progress bar.

    Returns:
        ``(N, 3, H, W)`` float32 images in [-1, 1] on the CPU, ``H = h * f`` for the generator's ``h x w`` grid and
        the tokenizer's downsampling factor ``f``.
    """
    gen = LoadedGenerator.of(generator)
    loaded = LoadedModel.of(tokenizer)
    options = SamplingOptions(cfg_scale, cfg_schedule, tuple(cfg_interval), temperature, top_k, top_p, seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")
    check_generator_tokenizer(gen, loaded, force=force)
    classes = torch.as_tensor(classes)
    if classes.ndim != 1 or classes.shape[0] == 0 or classes.dtype.is_floating_point:
        raise ValueError(f"classes must be a non-empty (N,) sequence of class ids, got shape {tuple(classes.shape)}")
    _check_ready(gen, options, classes)
    chunks = []
    with _progress(classes.shape[0], "sample", progress) as bar:
        for start in range(0, classes.shape[0], batch_size):
            batch = classes[start : start + batch_size].long()  # (B,)
            chunks.append(_sample_batch(gen.model, loaded.tokenizer, batch, options, sample_offset + start))
            bar.update(batch.shape[0])
    return torch.cat(chunks)  # (N, 3, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# the sample folder
def sample_name(index: int, label: int) -> str:
    """File name of sample ``index`` of class ``label``: ``000123_c207.png``."""
    return f"{index:06d}_c{label}.png"


def _valid_png(path: Path, size: tuple[int, int]) -> bool:
    """True when ``path`` decodes completely as an RGB image of ``size`` = ``(H, W)``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.mode == "RGB" and image.size == (size[1], size[0])
    except (OSError, ValueError, SyntaxError):
        return False


def _zip_entry(name: str) -> zipfile.ZipInfo:
    # a fixed time stamp: the same samples give the same bytes (zipfile would stamp the current time)
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def pack_npz(
    path: str | os.PathLike, files: Sequence[str | os.PathLike], labels: np.ndarray, size: tuple[int, int]
) -> Path:
    """Write an ADM-layout ``.npz`` (``arr_0`` uint8 ``N x H x W x 3``, ``labels`` int64 ``(N,)``) from image files,
    one image in memory at a time; stored uncompressed (as ``np.savez``), so readers can memory-map it. Written
    atomically; the same images and labels always give the same bytes.

    Args:
        path: The ``.npz`` to write.
        files: The N image files, in sample order.
        labels: ``(N,)`` class labels.
        size: ``(H, W)`` every image must have.
    """
    from PIL import Image

    from fvq.weights import atomic_path

    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(files),):
        raise ValueError(f"need one label per file: {len(files)} files, labels of shape {labels.shape}")
    h, w = size
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(_zip_entry("arr_0.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(files), h, w, 3)})
            for file in files:
                with Image.open(file) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
                if array.shape != (h, w, 3):
                    raise ValueError(f"{file} is {array.shape[0]}x{array.shape[1]}, expected {h}x{w}")
                f.write(array.tobytes())
        with archive.open(_zip_entry("labels.npy"), "w") as f:
            np.lib.format.write_array(f, labels)
    return path


@dataclass
class SampleReport:
    """What :func:`sample_to_folder` did (the same on every rank).

    Attributes:
        out_dir: The output folder.
        num_samples: Samples of the run.
        generated: Samples generated by this call, over all ranks.
        reused: Samples found already written (a resumed run) and kept.
        image_size: ``(H, W)``.
        images_dir: Folder of the PNGs, or ``None`` when they were not kept.
        npz: The ``.npz`` written, or ``None``.
        labels: ``labels.json``.
        config: ``sample_config.json``.
        seconds: Wall time of the call.
    """

    out_dir: Path
    num_samples: int
    generated: int
    reused: int
    image_size: tuple[int, int]
    images_dir: Path | None
    npz: Path | None
    labels: Path
    config: Path
    seconds: float


_T = TypeVar("_T")


def _on_every_rank(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on every rank; when it fails on any rank, fail on all (no rank is left waiting in a collective)."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        error = err
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(reports):
        if message is not None:
            raise ValueError(f"rank {rank}: {message}")
    return result  # type: ignore[return-value]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or choose another output folder") from None


def _check_out_dir(out_dir: Path, settings: dict[str, Any], names: set[str]) -> dict[str, Any] | None:
    """Refuse a folder holding samples of another run; return its previous record when it holds this run's."""
    record_path, images = out_dir / SAMPLE_CONFIG, out_dir / IMAGES_DIR
    if record_path.is_file():
        record = _read_json(record_path)
        if not isinstance(record, dict) or record.get("format") != SAMPLES_FORMAT:
            raise ValueError(
                f"{record_path} was not written by fvq sample; choose another output folder for these samples"
            )
        previous = record.get("settings") or {}
        differ = [k for k in SETTING_KEYS if previous.get(k) != settings[k]]
        if differ:
            shown = ", ".join(f"{k}: {previous.get(k)!r} there vs {settings[k]!r} now" for k in differ[:4])
            raise ValueError(
                f"{out_dir} holds samples of another run ({shown}); choose another output folder, or delete it to "
                f"start again"
            )
    else:
        found = [p.name for p in (out_dir / NPZ_NAME, out_dir / LABELS_NAME) if p.exists()]
        if images.is_dir() and any(n.endswith(".png") for n in os.listdir(images)):
            found.append(f"{IMAGES_DIR}/*.png")
        if found:
            raise ValueError(
                f"{out_dir} holds samples ({', '.join(found)}) but no {SAMPLE_CONFIG} saying how they were made; "
                f"choose another output folder"
            )
        record = None
    if images.is_dir():
        strays = sorted(n for n in os.listdir(images) if not n.startswith(".") and n not in names)
        if strays:
            raise ValueError(
                f"{images} holds {len(strays)} files that are not samples of this run (e.g. {strays[0]}); choose "
                f"another output folder"
            )
    return record


def _complete(record: dict[str, Any] | None, out_dir: Path, *, png: bool, npz: bool) -> bool:
    """Whether a previous call finished this run with every output now asked for."""
    if record is None or record.get("status") != "complete":
        return False
    files = record.get("files") or {}
    has_png = files.get("images") is not None and (out_dir / IMAGES_DIR).is_dir()
    has_npz = files.get("npz") is not None and (out_dir / NPZ_NAME).is_file()
    return (has_png or not png) and (has_npz or not npz) and (out_dir / LABELS_NAME).is_file()


def sample_to_folder(
    generator: GPT | LoadedGenerator,
    tokenizer: Tokenizer | LoadedModel,
    out_dir: str | os.PathLike,
    plan: ClassPlan,
    options: SamplingOptions,
    *,
    batch_size: int = 32,
    write_npz: bool = False,
    keep_png: bool = True,
    force: bool = False,
    progress: bool = False,
) -> SampleReport:
    """Generate ``plan.num_samples`` images into ``out_dir``; the pipeline of ``fvq sample``.

    Writes ``out_dir/images/{index:06d}_c{class}.png`` (each atomically), then ``labels.json`` (the class of each
    sample), ``samples.npz`` when asked (ADM layout: ``arr_0`` uint8 ``N x H x W x 3`` and ``labels``, packed from the
    PNGs one image at a time) and ``sample_config.json`` (settings, identities, class balance, timing). A record
    of the settings is written before the first image, so an interrupted call resumes: samples whose PNG decodes at
    the right size are kept, the others generated. A folder holding another run's samples is refused before anything
    is written.

    Under ``torchrun`` (a process group set up, e.g. by :func:`fvq.distributed.init_distributed`) every rank calls
    this: the samples are cut into blocks of ``batch_size`` consecutive indices, block ``b`` going to rank
    ``b % world_size``; each rank writes its own PNGs, and rank 0 writes the other files after a barrier.

    Args:
        generator: From :func:`load_generator`.
        tokenizer: From :func:`~fvq.inference.loading.load_model`.
        out_dir: The output folder (created).
        plan: The class of each sample (:func:`plan_classes`).
        options: The sampling settings.
        batch_size: Samples per generator call (the guided batch is twice as large); does not change the images.
        write_npz: Also write ``samples.npz``.
        keep_png: Keep the PNGs (``False`` needs ``write_npz``: the PNGs are removed once the ``.npz`` is written).
        force: Sample with a tokenizer other than the recorded one (see :func:`check_generator_tokenizer`).
        progress: Show a progress bar on rank 0 (rate and ETA of its share).

    Returns:
        A :class:`SampleReport`.
    """
    started = time.time()
    gen = LoadedGenerator.of(generator)
    loaded = LoadedModel.of(tokenizer)
    out_dir = Path(out_dir)
    rank, world = placement()
    labels = plan.labels
    names = [sample_name(i, int(c)) for i, c in enumerate(labels)]
    factor = loaded.tokenizer.downsample_factor
    size = (gen.config.grid[0] * factor, gen.config.grid[1] * factor)
    settings: dict[str, Any] = {}

    # 1. Every check before anything is written; a failure on one rank stops all of them.
    def check() -> dict[str, Any] | None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not keep_png and not write_npz:
            raise ValueError("keep_png=False needs write_npz=True: nothing would be kept")
        if plan.num_classes != gen.config.num_classes:
            raise ValueError(
                f"the class plan is for {plan.num_classes} classes but the generator has {gen.config.num_classes}"
            )
        check_generator_tokenizer(gen, loaded, force=force)
        _check_ready(gen, options, labels)
        settings.update(
            generator_identity=gen.identity,
            tokenizer_identity=loaded.identity,
            image_size=list(size),
            num_samples=plan.num_samples,
            num_classes=plan.num_classes,
            classes=plan.to_dict(),
            labels_sha256=plan.labels_sha256,
            **options.to_dict(),
        )
        return _check_out_dir(out_dir, settings, set(names))

    previous = _on_every_rank(check)
    record: dict[str, Any] = {
        "format": SAMPLES_FORMAT,
        "format_version": SAMPLES_FORMAT_VERSION,
        "status": "incomplete",
        **{k: v for k, v in settings.items() if k not in ("generator_identity", "tokenizer_identity")},
        "settings": settings,
        "generator": gen.describe(),
        "tokenizer": {
            "path": str(loaded.path),
            "identity": loaded.identity,
            "codebook_size": loaded.tokenizer.codebook_size,
            "downsample_factor": factor,
            "training_image_size": loaded.image_size,
        },
        "force": bool(force),
        "fvq_version": _version(),
    }
    images_dir, record_path, labels_path, npz_path = (
        out_dir / IMAGES_DIR,
        out_dir / SAMPLE_CONFIG,
        out_dir / LABELS_NAME,
        out_dir / NPZ_NAME,
    )
    if _complete(previous, out_dir, png=keep_png, npz=write_npz):
        return SampleReport(
            out_dir=out_dir,
            num_samples=plan.num_samples,
            generated=0,
            reused=plan.num_samples,
            image_size=size,
            images_dir=images_dir if keep_png else None,
            npz=npz_path if write_npz else None,
            labels=labels_path,
            config=record_path,
            seconds=time.time() - started,
        )

    # 2. Rank 0 records the settings before the first image, so an interrupted run can be recognised and resumed.
    def start() -> None:
        if rank == 0:
            images_dir.mkdir(parents=True, exist_ok=True)
            for leftover in images_dir.glob(".*.tmp"):  # temporary files of writes cut short
                leftover.unlink(missing_ok=True)
            _write_json(record_path, record)

    _on_every_rank(start)

    # 3. This rank's blocks: the samples without a valid PNG, generated in contiguous runs of at most batch_size.
    blocks = [
        (start, min(start + batch_size, plan.num_samples))
        for b, start in enumerate(range(0, plan.num_samples, batch_size))
        if b % world == rank
    ]
    todo = [(a, b, [i for i in range(a, b) if not _valid_png(images_dir / names[i], size)]) for a, b in blocks]
    todo = [(a, b, missing) for a, b, missing in todo if missing]
    mine = sum(len(missing) for _, _, missing in todo)
    desc = "sample" if world == 1 else f"sample (rank 0 of {world})"
    with _progress(mine, desc, progress and rank == 0) as bar:
        for _, _, missing in todo:
            first, last = missing[0], missing[-1] + 1  # one contiguous call; samples already written are redrawn
            classes = torch.from_numpy(labels[first:last])  # (B,)
            images = _sample_batch(gen.model, loaded.tokenizer, classes, options, first)  # (B, 3, H, W)
            keep = [i - first for i in missing]
            write_images(images[keep], [names[i] for i in missing], images_dir)
            bar.update(len(missing))
    generated = sum(int(n) for n in all_gather_objects(mine))  # type: ignore[call-overload]

    # 4. Every rank has written its PNGs (the gather above waits for all of them). Rank 0 checks that every sample is
    # there, then writes the labels, the .npz and the final record.
    def finish() -> None:
        if rank != 0:
            return
        absent = [n for n in names if not (images_dir / n).is_file()]
        if absent:
            raise ValueError(f"{len(absent)} samples are missing after sampling (e.g. {absent[0]}); run again")
        _write_json(labels_path, labels.tolist())
        if write_npz:
            pack_npz(npz_path, [images_dir / n for n in names], labels, size)
        if not keep_png:
            shutil.rmtree(images_dir)
        seconds = time.time() - started
        counts = plan.class_counts()
        present = [c for c in counts if c]
        record.update(
            status="complete",
            class_counts=counts,
            class_balance={
                "classes_present": len(present),
                "min_per_class": min(present),
                "max_per_class": max(present),
                "uniform": min(present) == max(present),
            },
            files={
                "images": f"{IMAGES_DIR}/" if keep_png else None,
                "npz": NPZ_NAME if write_npz else None,
                "labels": LABELS_NAME,
            },
            run={
                "batch_size": batch_size,
                "world_size": world,
                "device": str(gen.model.device),
                "generated": generated,
                "reused": plan.num_samples - generated,
                "seconds": round(seconds, 3),
                "samples_per_second": round(generated / seconds, 4) if seconds > 0 else None,
            },
        )
        _write_json(record_path, record)

    _on_every_rank(finish)
    return SampleReport(
        out_dir=out_dir,
        num_samples=plan.num_samples,
        generated=generated,
        reused=plan.num_samples - generated,
        image_size=size,
        images_dir=images_dir if keep_png else None,
        npz=npz_path if write_npz else None,
        labels=labels_path,
        config=record_path,
        seconds=time.time() - started,
    )


def _write_json(path: Path, value: Any) -> None:
    from fvq.weights import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def _version() -> str:
    from fvq.version import __version__

    return __version__
