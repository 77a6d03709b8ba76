"""The suite's results, found by what was run rather than by where they are filed.

A run is fully described by its training config (seed included) and its evaluation protocol; the *run key* is a
digest of both. Several experiments may name the same run (the paper's recipe at K = 16,384 is a row of Fig. 3,
Table 3, the group-size ablation and the baselines): it is trained once, its summary is filed under the experiment
that ran it first (``results/<experiment>/<run>.json``), and every variant with the same key at that seed reads it.
The suite's planned runs and CPU time count each key once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvq.repro.experiments import Variant
from fvq.repro.protocol import Protocol
from fvq.training.config import TrainConfig


def run_config(
    variant: Variant, seed: int, overrides: dict[str, Any] | None = None, device: str = "cpu"
) -> TrainConfig:
    """The training config of one run: the variant's config at ``seed`` with ``overrides``, on ``device``."""
    extra = dict(overrides or {})
    extra.setdefault("device", device)
    return variant.config(seed, extra)


def summary_path(results_dir: str | Path, variant: Variant, seed: int) -> Path:
    """Where ``variant`` at ``seed`` files its own summary: ``results/<experiment>/<variant>_seed<S>.json``."""
    return Path(results_dir) / variant.experiment / f"{variant.run_name(seed)}.json"


def run_key(config: dict[str, Any], protocol: dict[str, Any]) -> str:
    """Digest of a run's config (plain data, :meth:`TrainConfig.to_dict`) and protocol (:meth:`Protocol.as_dict`)."""
    text = json.dumps({"config": config, "protocol": protocol}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def variant_run_key(variant: Variant, seed: int) -> str:
    """The key of ``variant`` at ``seed`` as ``fvq repro run`` trains it (no extra overrides, on the CPU)."""
    protocol = Protocol.from_overrides(variant.protocol).as_dict()
    return run_key(run_config(variant, seed).to_dict(), protocol)


def summary_key(summary: dict[str, Any]) -> str:
    """The key of the run a summary describes (from the config and protocol it records)."""
    return run_key(summary["config"], summary["protocol"])


@dataclass(frozen=True)
class Result:
    """One finished run's summary and where it is filed."""

    path: Path
    summary: dict[str, Any]

    @property
    def home(self) -> str:
        """``experiment/variant`` the summary is filed under."""
        return f"{self.summary['experiment']}/{self.summary['variant']}"


class ResultIndex:
    """Every finished summary under ``results_dir``, by filing place and by run key."""

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir)
        self.by_path: dict[Path, Result] = {}
        self.by_key: dict[str, Result] = {}
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*.json")):
                summary = json.loads(path.read_text())
                if summary.get("status") != "finished":
                    continue
                result = Result(path, summary)
                self.by_path[path] = result
                self.by_key.setdefault(summary_key(summary), result)

    def find(self, variant: Variant, seed: int, key: str | None = None) -> Result | None:
        """The run's result: its own summary, else one filed elsewhere with the same key (``key`` defaults to the
        variant's at ``seed``)."""
        own = self.by_path.get(summary_path(self.root, variant, seed))
        if own is not None:
            return own
        return self.by_key.get(key if key is not None else variant_run_key(variant, seed))

    def finished(self, runs: Iterable[PlannedRun]) -> int:
        """How many of the distinct ``runs`` have a result."""
        return sum(self.find(r.home, r.seed, r.key) is not None for r in runs)

    def runs_of(self, variant: Variant) -> list[Result]:
        """The variant's results, seeds in order: every summary filed under it (seeds run by hand included) and,
        for its planned seeds without one, a summary with the same key filed elsewhere."""
        folder, prefix = self.root / variant.experiment, f"{variant.name}_seed"
        own = {
            r.summary["seed"]: r
            for p, r in self.by_path.items()
            if p.parent == folder and p.stem.startswith(prefix) and p.stem[len(prefix) :].isdigit()
        }
        for seed in variant.seeds:
            if seed not in own:
                found = self.by_key.get(variant_run_key(variant, seed))
                if found is not None:
                    own[seed] = found
        return [own[s] for s in sorted(own)]


@dataclass(frozen=True)
class PlannedRun:
    """One distinct run of the suite and the variants that name it (the first one files its summary)."""

    key: str
    seed: int
    variants: tuple[Variant, ...]

    @property
    def home(self) -> Variant:
        return self.variants[0]

    @property
    def cpu_hours(self) -> float:
        return self.home.budget.cpu_hours(1)


def planned_runs(variants: Iterable[Variant]) -> list[PlannedRun]:
    """The distinct runs of ``variants`` (each variant at each of its seeds), in order of first mention."""
    order: list[str] = []
    named: dict[str, tuple[int, list[Variant]]] = {}
    for v in variants:
        for seed in v.seeds:
            key = variant_run_key(v, seed)
            if key not in named:
                order.append(key)
                named[key] = (seed, [])
            named[key][1].append(v)
    return [PlannedRun(k, named[k][0], tuple(named[k][1])) for k in order]
