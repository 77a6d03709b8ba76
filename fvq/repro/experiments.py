"""Experiment files of the reproduction suite: discovery, parsing, and the training config of each run.

The suite lives in ``experiments/`` at the repository root, one folder per experiment (a claim of the paper), one YAML
file per variant::

    experiments/fig3_usage_curves/linear_k4096.yaml

    # Fig. 3: linear projector, K = 4,096, with learning annealing
    base: ../base.yaml                 # a config shipped in fvq/configs, or a path relative to this file
    overrides:                         # merged into the base: mappings merge key by key, null removes a key
      quantizer: {projector: {type: linear}}
      max_steps: 600
    seeds: [0, 1, 2]
    budget: {train_minutes: 10, eval_minutes: 1}   # wall minutes on a 2-core CPU, per seed
    protocol: {min_tokens_per_code: 64}            # optional: overrides of the evaluation protocol
    label: linear, annealing, K = 4,096            # optional: the name in tables and legends
    paper: "Table 5: linear + annealing, 16k: 53 % usage, rFID 1.52"   # optional: the paper's matching figure

An override whose ``quantizer`` (or nested ``quantizer.quantizer``) names another ``type`` than the base's replaces
that section instead of merging into it (a residual or multi-scale quantizer does not take a VQ's keys).

Every shipped experiment starts from ``experiments/base.yaml`` (the suite's own copy of the tiny f4 recipe), so the
demo's configs can change without changing the suite. A run is one variant at one seed, named
``<variant>_seed<S>``; its summary goes to ``results/<experiment>/<variant>_seed<S>.json``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fvq.training.config import TrainConfig, config_from_dict, merge, resolve_config_path

EXPERIMENT_KEYS = ("base", "overrides", "seeds", "budget", "protocol", "label", "paper")
BUDGET_KEYS = ("train_minutes", "eval_minutes")
CORES = 2  # the budgets are wall minutes on a 2-core CPU; CPU time counts both cores


@dataclass(frozen=True)
class Budget:
    """Planned wall time of one seed of a variant on a 2-core CPU.

    Attributes:
        train_minutes: Training, validations during training included.
        eval_minutes: The protocol's final evaluation.
    """

    train_minutes: float
    eval_minutes: float = 0.0

    @property
    def minutes(self) -> float:
        return self.train_minutes + self.eval_minutes

    def cpu_hours(self, seeds: int = 1) -> float:
        """CPU hours of ``seeds`` runs (wall minutes x 2 cores)."""
        return self.minutes * CORES * seeds / 60.0


@dataclass(frozen=True)
class Variant:
    """One experiment file.

    Attributes:
        experiment: The folder name, e.g. ``fig3_usage_curves``.
        name: The file's stem, e.g. ``linear_k4096``.
        path: The YAML file.
        description: Its first comment line.
        base: The base config: a preset name or a resolved path.
        overrides: Nested overrides merged into the base.
        seeds: Seeds to run.
        budget: Planned wall time per seed.
        protocol: Overrides of :class:`fvq.repro.protocol.Protocol` fields.
        label: Short name for tables and legends (defaults to ``name``).
        paper: The paper's figure this variant corresponds to (quoted), or empty.
    """

    experiment: str
    name: str
    path: Path
    description: str
    base: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    budget: Budget
    protocol: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    paper: str = ""

    @property
    def id(self) -> str:
        """``experiment/name``."""
        return f"{self.experiment}/{self.name}"

    def run_name(self, seed: int) -> str:
        return f"{self.name}_seed{seed}"

    def config_dict(self, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's training config as plain data: base, then overrides, then ``seed`` (then ``extra``)."""
        path = resolve_config_path(self.base)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} (base of {self.path}) must hold a YAML mapping")
        data = merge(data, _replace_changed_types(data, self.overrides))
        data["seed"] = int(seed)
        if extra:
            data = merge(data, extra)
        return data

    def config(self, seed: int, extra: dict[str, Any] | None = None) -> TrainConfig:
        """The run's validated training config."""
        config = config_from_dict(self.config_dict(seed, extra))
        if not isinstance(config, TrainConfig):
            raise ValueError(f"{self.path}: the reproduction suite trains tokenizers, got task {config.task!r}")
        return config


def _replace_changed_types(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides with every quantizer section whose ``type`` differs from the base's marked for replacement: the
    base's section is dropped first, so the merge keeps only the override's keys."""
    out = copy.deepcopy(overrides)
    node_base, node_over = base, out  # base: the caller's own copy, edited in place
    while isinstance(node_base, dict) and isinstance(node_over.get("quantizer"), dict):
        b, o = node_base.get("quantizer"), node_over["quantizer"]
        if isinstance(b, dict) and "type" in o and o["type"] != b.get("type", "vq"):
            node_base.pop("quantizer")
            break
        node_base, node_over = b, o
    return out


def codebook_of(quantizer: dict[str, Any]) -> dict[str, Any]:
    """The innermost quantizer config holding ``codebook_size`` (residual and multi-scale configs nest one)."""
    q = quantizer
    while isinstance(q, dict) and "codebook_size" not in q and isinstance(q.get("quantizer"), dict):
        q = q["quantizer"]
    return q


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def load_variant(path: str | Path) -> Variant:
    """Parse one experiment file (see the module docstring); errors name the file and the key."""
    path = Path(path)
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected a subset of {list(EXPERIMENT_KEYS)}")
    for key in ("base", "seeds", "budget"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (an experiment names base, seeds and budget)")
    base = str(data["base"])
    local = path.parent / base
    if local.is_file():
        base = str(local.resolve())
    resolve_config_path(base)  # raises with the list of presets
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: overrides must be a mapping of config keys, got {type(overrides).__name__}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds must be a non-empty list of ints, got {seeds!r}")
    budget = data["budget"]
    if not isinstance(budget, dict) or "train_minutes" not in budget or set(budget) - set(BUDGET_KEYS):
        raise ValueError(f"{path}: budget must be a mapping with train_minutes (and eval_minutes), got {budget!r}")
    protocol = data.get("protocol") or {}
    if not isinstance(protocol, dict):
        raise ValueError(f"{path}: protocol must be a mapping, got {type(protocol).__name__}")
    return Variant(
        experiment=path.parent.name,
        name=path.stem,
        path=path,
        description=_first_comment(text),
        base=base,
        overrides=copy.deepcopy(overrides),
        seeds=tuple(int(s) for s in seeds),
        budget=Budget(float(budget["train_minutes"]), float(budget.get("eval_minutes", 0.0))),
        protocol=dict(protocol),
        label=str(data.get("label", path.stem)),
        paper=str(data.get("paper", "")),
    )


def discover(experiments_dir: str | Path) -> dict[str, list[Variant]]:
    """Every experiment folder of ``experiments_dir`` and its variants, sorted by name."""
    root = Path(experiments_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no experiments folder at {root} (run from the repository root or pass --experiments)")
    out: dict[str, list[Variant]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.yaml"))
        if files:
            out[folder.name] = [load_variant(f) for f in files]
    return out


def select(experiments_dir: str | Path, name: str) -> list[Variant]:
    """The variants ``name`` denotes: ``experiment`` (all its files) or ``experiment/variant``."""
    suite = discover(experiments_dir)
    experiment, _, variant = name.strip("/").partition("/")
    if experiment not in suite:
        raise ValueError(f"unknown experiment {experiment!r}; experiments: {sorted(suite)}")
    variants = suite[experiment]
    if variant:
        variant = variant.removesuffix(".yaml")
        variants = [v for v in variants if v.name == variant]
        if not variants:
            names = [v.name for v in suite[experiment]]
            raise ValueError(f"unknown variant {variant!r} of {experiment}; variants: {names}")
    return variants
