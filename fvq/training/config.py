"""Experiment configuration: dataclasses, YAML presets and ``key=value`` overrides.

A training run is described by one config of its kind (:class:`TrainConfig` for tokenizers,
:class:`GeneratorTrainConfig` for the generator; the ``task:`` key selects it). It is read from a YAML file
(``configs/*.yaml``; a name like ``tiny_fvq`` finds the preset shipped with fvq), updated by command-line overrides
such as ``optim.lr=2e-4 quantizer.codebook_size=8192``, validated, and stored as plain data in every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class LossConfig:
    """Weights and options of the tokenizer loss (``fvq.losses.TokenizerLoss``)."""

    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    adversarial_weight: float = 0.5
    adversarial_start: int = 20_000
    gan_loss: str = "hinge"
    adaptive_weight: bool = False
    quantizer_weight: float = 1.0
    discriminator: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Adam for the tokenizer and for the discriminator, LR scaled by ``global_batch_size / base_batch_size``."""

    lr: float = 1e-4
    base_batch_size: int = 128
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    discriminator_lr: float | None = None


@dataclass
class ScheduleConfig:
    """Learning annealing (see :class:`fvq.training.AnnealingSchedule`), shared by generator and discriminator."""

    warmup_fraction: float = 0.1
    warmup_start: float = 0.005
    constant_fraction: float = 0.3
    final_factor: float = 0.01
    decay: str = "linear"


@dataclass
class RunConfig:
    """The fields every training run has, whatever it trains; the engine (:mod:`fvq.training.engine`) reads these.

    Each model kind subclasses it with its own fields (:class:`TrainConfig` for tokenizers); a YAML file names its
    kind with ``task:`` (default ``tokenizer``).

    Attributes:
        task: The kind of model trained (a key of :data:`TASKS`).
        optim: Optimizer settings; the LR is scaled by ``global_batch_size / base_batch_size``.
        schedule: Learning-rate schedule (a pure function of the step).
        global_batch_size: Samples per optimizer step over all ranks and accumulation steps.
        grad_accum_steps: Micro-batches per optimizer step on each rank.
        max_steps: Optimizer steps of the whole run (the schedule's length). ``epochs`` overrides it when set.
        epochs: Train for this many passes over the data instead of ``max_steps``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast). fp16 needs CUDA; bf16 also runs on CPU, where
            it is only fast on CPUs with native bf16 (AVX512-BF16 or AMX; a warning says when the CPU lacks it).
        channels_last: Model weights and input image batches in the channels-last memory format (NHWC), which
            convolutions prefer on tensor-core GPUs and on CPUs with oneDNN.
        compile: ``torch.compile`` the model (for a tokenizer: its encoder and decoder; the quantizer stays eager):
            ``false``, ``true`` or the keyword arguments of ``nn.Module.compile``, e.g. ``{mode: max-autotune}``.
            The module is compiled in place, so state dicts keep their keys.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: Base seed; rank ``r`` uses ``seed + r`` for its own randomness.
        num_workers: DataLoader workers per rank.
        pin_memory: Pin loader batches in page-locked memory (faster, asynchronous host-to-GPU copies); ``None``
            pins when training on CUDA.
        persistent_workers: Keep the loader's workers alive from one epoch to the next (with ``num_workers > 0``).
        prefetch_factor: Batches each worker loads ahead (with ``num_workers > 0``; ``None``: PyTorch's default, 2).
        log_every, val_every, checkpoint_every: Intervals in optimizer steps (0 disables).
        keep_checkpoints: How many recent checkpoints to keep.
        max_nonfinite_steps: Stop after this many consecutive steps with a non-finite loss (each is skipped).
        tensorboard: Also write TensorBoard scalars (when tensorboard is installed).
    """

    task: str = "tokenizer"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    global_batch_size: int = 128
    grad_accum_steps: int = 1
    max_steps: int = 1000
    epochs: float | None = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: Any = False
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool | None = None
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5
    tensorboard: bool = True

    def validate(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_steps < 1 and self.epochs is None:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        compile_options(self.compile)  # raises on a malformed value
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and (self.prefetch_factor < 1 or self.num_workers == 0):
            raise ValueError(
                f"prefetch_factor must be >= 1 and needs num_workers > 0, got {self.prefetch_factor} with "
                f"num_workers={self.num_workers}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings): what checkpoints and ``config.yaml`` store; the kind's own
        fields first, then the run fields."""
        data = _plain(dataclasses.asdict(self))
        own = [f.name for f in dataclasses.fields(self) if f.name not in _RUN_FIELDS]
        return {"task": data["task"], **{k: data[k] for k in own}, **{k: data[k] for k in _RUN_FIELDS if k != "task"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, data, path="")


COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options")


def compile_options(value: Any) -> dict[str, Any] | None:
    """The keyword arguments of ``nn.Module.compile`` that a config's ``compile`` value asks for, or ``None`` for no
    compilation: ``false`` -> ``None``, ``true`` -> ``{}``, a mapping -> itself (keys of :data:`COMPILE_KEYS`)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(f"unknown compile key(s) {unknown}; valid keys: {list(COMPILE_KEYS)}")
        return dict(value)
    raise ValueError(f"compile must be true, false or a mapping such as {{mode: max-autotune}}, got {value!r}")


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a tokenizer training run: the run fields of :class:`RunConfig` and these.

    Attributes:
        model: Autoencoder config for ``Tokenizer.from_config`` (e.g. ``{"preset": "tiny_f4"}``).
        quantizer: Quantizer config for ``fvq.quantizers.registry.build_quantizer``.
        data: Training dataset config for ``fvq.data.build_dataset`` (split ``"train"``).
        val_data: Held-out dataset config (split ``"val"``); ``None`` uses ``data``.
        loss: Weights and options of the tokenizer loss.
        val_batch_size: Batch size per rank for validation.
        val_psnr_images: Decode only the first this many held-out images for PSNR and the reconstruction grid (usage
            always counts the whole set, which only needs the encoder); ``None`` decodes all.
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny_f4"})
    quantizer: dict[str, Any] = field(
        default_factory=lambda: {"type": "vq", "codebook_size": 4096, "codebook_dim": 256}
    )
    data: dict[str, Any] = field(default_factory=lambda: {"type": "embedded", "image_size": 32})
    val_data: dict[str, Any] | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    val_batch_size: int = 64
    val_psnr_images: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.task != "tokenizer":
            raise ValueError(f"a tokenizer config has task: tokenizer, got {self.task!r}")
        if self.val_psnr_images is not None and self.val_psnr_images < 1:
            raise ValueError(f"val_psnr_images must be >= 1 or null (all), got {self.val_psnr_images}")
        for name in ("model", "quantizer", "data"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")


@dataclass
class GeneratorOptimConfig:
    """AdamW for the generator (LlamaGen's recipe): LR scaled by ``global_batch_size / base_batch_size``, weight decay
    on matrices only (parameters with ``ndim >= 2``: linear and embedding weights; not norms)."""

    lr: float = 1e-4
    base_batch_size: int = 256
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0


# Learning-rate schedules of the generator as fields of fvq.training.AnnealingSchedule. A config selects one with
# ``schedule: {preset: fvq}`` (other keys of the section override single fields).
GENERATOR_SCHEDULES: dict[str, dict[str, Any]] = {
    # LlamaGen: the base LR throughout
    "llamagen": {
        "warmup_fraction": 0.0,
        "warmup_start": 1.0,
        "constant_fraction": 1.0,
        "final_factor": 1.0,
        "decay": "none",
    },
    # FVQ (paper Table 6): no warmup, 5 % of the steps at the base LR, then linear to 0.01 x
    "fvq": {
        "warmup_fraction": 0.0,
        "warmup_start": 1.0,
        "constant_fraction": 0.05,
        "final_factor": 0.01,
        "decay": "linear",
    },
}


@dataclass
class GeneratorScheduleConfig(ScheduleConfig):
    """The generator's schedule; defaults are the ``llamagen`` preset of :data:`GENERATOR_SCHEDULES` (constant)."""

    warmup_fraction: float = 0.0
    warmup_start: float = 1.0
    constant_fraction: float = 1.0
    final_factor: float = 1.0
    decay: str = "none"


SHARDING = ("ddp", "fsdp")
# set from the token data (vocab_size, grid) or from the config's top level (num_classes, activation_checkpointing)
_GENERATOR_MODEL_KEYS_ELSEWHERE = ("vocab_size", "grid", "num_classes", "activation_checkpointing")


@dataclass
class GeneratorTrainConfig(RunConfig):
    """A class-conditional generator (LlamaGen's GPT, :mod:`fvq.generation`) trained on a tokenizer's tokens.

    The vocabulary and the token grid come from the token data, never from the config.

    Attributes:
        model: ``{"preset": "gpt_b", **GPTConfig fields}`` (dropouts, ``class_position_rope``, ...), or the shape
            (``dim``, ``n_layer``, ``n_head``) without a preset. Not ``vocab_size``, ``grid``, ``num_classes``.
        tokens: Token store of the training images (written by ``fvq encode``).
        val_tokens: Held-out token store for validation; ``None`` validates on the ``val`` split of ``tokens``
            (which reads training images: a warning says so).
        num_classes: Class labels of the model; ``None`` takes the token data's.
        ema: Decay of an exponential moving average of the weights (e.g. 0.9999), or ``None`` for none.
        sharding: ``"ddp"`` (replicated) or ``"fsdp"`` (PyTorch FSDP2, parameters sharded per transformer block)
            when several processes run.
        activation_checkpointing: Recompute each block in the backward pass (memory for compute).
        val_batch_size: Held-out sequences per forward on each rank.
        val_samples: Held-out sequences validated (the first ones of the store); ``None`` for all.
        optim: AdamW settings (:class:`GeneratorOptimConfig`).
        schedule: LR schedule; :data:`GENERATOR_SCHEDULES` names ``llamagen`` (constant, default) and ``fvq``.
    """

    task: str = "generator"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "gpt_b"})
    tokens: str | None = None
    val_tokens: str | None = None
    num_classes: int | None = None
    ema: float | None = None
    sharding: str = "ddp"
    activation_checkpointing: bool = False
    val_batch_size: int = 32
    val_samples: int | None = 10_000
    optim: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    schedule: GeneratorScheduleConfig = field(default_factory=GeneratorScheduleConfig)
    global_batch_size: int = 256
    log_every: int = 100
    val_every: int = 5000
    checkpoint_every: int = 5000

    def validate(self) -> None:
        super().validate()
        if self.task != "generator":
            raise ValueError(f"a generator config has task: generator, got {self.task!r}")
        if not self.tokens:
            raise ValueError("tokens must name the token store of the training images (e.g. tokens=/data/tokens)")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping, got {type(self.model).__name__}")
        elsewhere = sorted(set(self.model) & set(_GENERATOR_MODEL_KEYS_ELSEWHERE))
        if elsewhere:
            raise ValueError(
                f"model.{elsewhere[0]} is not set in the model section: vocab_size and grid come from the token data, "
                f"num_classes and activation_checkpointing are top-level keys"
            )
        from fvq.generation.gpt import PRESETS, GPTConfig

        known = {f.name for f in dataclasses.fields(GPTConfig)} | {"preset"}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"unknown model key(s) {unknown}; valid keys: {sorted(known - set(elsewhere))}")
        if "preset" not in self.model and not {"dim", "n_layer", "n_head"} <= set(self.model):
            raise ValueError(f"model needs a preset ({sorted(PRESETS)}) or dim, n_layer and n_head")
        if self.sharding not in SHARDING:
            raise ValueError(f"sharding must be one of {SHARDING}, got {self.sharding!r}")
        if self.sharding == "fsdp" and self.precision == "fp16":
            raise ValueError("sharding=fsdp trains in fp32 or bf16; fp16's loss scaling is not supported with it")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) or null, got {self.ema}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or null (from the data), got {self.num_classes}")
        if self.val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {self.val_batch_size}")
        if self.val_samples is not None and self.val_samples < 1:
            raise ValueError(f"val_samples must be >= 1 or null (all), got {self.val_samples}")
        if self.optim.base_batch_size < 1 or self.optim.lr <= 0 or self.optim.weight_decay < 0:
            raise ValueError("optim needs lr > 0, base_batch_size >= 1 and weight_decay >= 0")

    @property
    def base_lr(self) -> float:
        """The AdamW LR before the schedule: ``optim.lr * global_batch_size / optim.base_batch_size``."""
        return self.optim.lr * self.global_batch_size / self.optim.base_batch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorTrainConfig:
        """As :meth:`RunConfig.from_dict`; ``schedule`` may name a preset (``schedule: fvq`` or
        ``schedule: {preset: fvq, final_factor: 0.02}``), whose fields it expands to."""
        data = dict(data)
        schedule = data.get("schedule")
        if isinstance(schedule, str):
            schedule = {"preset": schedule}
        if isinstance(schedule, dict) and "preset" in schedule:
            schedule = dict(schedule)
            name = schedule.pop("preset")
            if name not in GENERATOR_SCHEDULES:
                raise ValueError(f"unknown schedule preset {name!r}; presets: {sorted(GENERATOR_SCHEDULES)}")
            data["schedule"] = {**GENERATOR_SCHEDULES[name], **schedule}
        return _from_dict(cls, data, path="")


_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
# task name -> its config class; a model kind registers itself here
TASKS: dict[str, type[RunConfig]] = {"tokenizer": TrainConfig, "generator": GeneratorTrainConfig}
# task name -> the module with its ``train(config, run_dir, resume=, max_steps=, overwrite=)`` and ``summary(result)``
TASK_MODULES: dict[str, str] = {
    "tokenizer": "fvq.training.tokenizer_task",
    "generator": "fvq.training.generator_task",
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {path or '<root>'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in section '{path}'" if path else ""
        raise ValueError(f"unknown config key(s) {unknown}{where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _section_type(fields[name]) if not path else None
        if sub is not None:
            kwargs[name] = _from_dict(sub, value or {}, path=name)
        elif name == "betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ValueError(f"optim.betas must be a pair like [0.9, 0.95], got {value!r}")
            kwargs[name] = tuple(float(v) for v in value)
        else:
            kwargs[name] = _coerce(value, fields[name].type, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Check scalar config values against the field's annotation; numeric strings such as ``1e-4`` (which YAML 1.1
    reads as a string) become numbers."""
    kinds = [part.strip() for part in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"config key {key} must not be null")
    if "float" in kinds and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} must be a number, got {value!r}") from None
    if "int" in kinds:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"config key {key} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"config key {key} must be an integer, got {value!r}")
        return int(value)
    if "bool" in kinds and not isinstance(value, bool):
        raise ValueError(f"config key {key} must be true or false, got {value!r}")
    if "str" in kinds and not isinstance(value, str):
        raise ValueError(f"config key {key} must be a string, got {value!r}")
    return copy.deepcopy(value)


_SECTIONS: dict[str, type] = {"loss": LossConfig, "optim": OptimConfig, "schedule": ScheduleConfig}


def _section_type(f: dataclasses.Field) -> type | None:
    """The dataclass of a config section: the one the field's default is made of (each kind may have its own
    ``optim`` or ``schedule`` with its own defaults), else :data:`_SECTIONS`'s."""
    factory = f.default_factory
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return factory
    return _SECTIONS.get(f.name)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path as given, or the name of a preset shipped in ``fvq/configs`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a preset; presets: {presets}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=2e-4", "quantizer.projector.type=linear"]`` -> nested dict; values parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=2e-4)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} has an empty key part")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return result


def merge(base: dict[str, Any], update: dict[str, Any], _depth: int = 0) -> dict[str, Any]:
    """Recursive dict update (returns a new dict); mappings merge. ``null`` sets a top-level field to null and
    removes a key inside a section (``data.val_samples=null`` leaves the key out, so its default applies)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, _depth + 1)
        elif value is None and _depth > 0:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _switch_data_types(base: dict[str, Any], update: dict[str, Any], merged: dict[str, Any]) -> None:
    """When an override changes a data section's ``type``, drop the preset's keys the new type does not take,
    saying so: ``fvq train tiny_fvq data.type=folder data.path=DIR`` needs no copy of the preset."""
    from fvq.data.build import DATASET_TYPES

    for section in ("data", "val_data"):
        new, old = update.get(section), base.get(section)
        if not (isinstance(new, dict) and isinstance(old, dict) and isinstance(merged.get(section), dict)):
            continue
        kind, before = new.get("type"), old.get("type", "embedded")
        if kind is None or kind == before or kind not in DATASET_TYPES:
            continue
        dropped = sorted(k for k in merged[section] if k not in DATASET_TYPES[kind] and k not in new)
        for key in dropped:
            del merged[section][key]
        if dropped:
            logger.warning(
                "%s.type changed from %r to %r: dropped %s, which type %r does not take",
                section,
                before,
                kind,
                ", ".join(f"{section}.{k}" for k in dropped),
                kind,
            )


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML preset or file, apply ``key=value`` overrides, validate, return a :class:`TrainConfig`."""
    path = resolve_config_path(name_or_path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level, got {type(data).__name__}")
    update = parse_overrides(overrides or [])
    merged = merge(data, update)
    _switch_data_types(data, update, merged)
    return config_from_dict(merged)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """The config of the kind ``data["task"]`` names (default ``tokenizer``), validated."""
    task = data.get("task", "tokenizer")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    config = TASKS[task].from_dict(data)
    config.validate()
    return config
