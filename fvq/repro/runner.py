"""Train and evaluate one run of the reproduction suite, resumably, and write its summary.

A run (one experiment file at one seed) trains in ``runs/repro/<experiment>/<variant>_seed<S>/`` with fvq's training
engine. Started again after an interruption, it continues from the newest checkpoint of that folder (the engine
refuses a changed config); a finished run is not trained again. Once training has reached its last step, the
protocol (:mod:`fvq.repro.protocol`) evaluates the final model and the summary is written to
``results/<experiment>/<variant>_seed<S>.json``: metrics, curves as data, the command, the config, the machine, wall
and CPU time summed over every invocation. The summary is the result: the run folder can be deleted. A run another
experiment has already finished (same config, seed and protocol: :mod:`fvq.repro.results`) is not trained again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fvq.repro.experiments import Variant
from fvq.repro.machine import Stopwatch, git_commit, machine_info
from fvq.repro.protocol import (
    Protocol,
    check_heldout,
    evaluate_heldout,
    heldout_data,
    restarted_codes,
    tokens_per_image,
)
from fvq.repro.results import ResultIndex, run_config, run_key, summary_path
from fvq.runs import RunFolder, read_checkpoint_entry
from fvq.weights import atomic_write_bytes

TIME_FILE = "repro_time.json"  # in the run folder: wall and CPU time of each invocation
SUMMARY_VERSION = 1


@dataclass
class RunOutcome:
    """What :func:`run_variant` did.

    Attributes:
        status: ``"finished"`` (summary written), ``"partial"`` (stopped before the last step; run again to continue),
            ``"skipped"`` (a summary existed and ``force`` was not given) or ``"shared"`` (the same run, same config,
            seed and protocol, is filed under another experiment: its summary serves this one too).
        run_dir: The run folder (the other experiment's for a shared run).
        summary_path: The summary file (written or existing), ``None`` for a partial run.
        steps: Optimizer steps done so far.
        total_steps: Steps of the whole run.
    """

    status: str
    run_dir: Path
    summary_path: Path | None
    steps: int
    total_steps: int


def command_line(variant: Variant, seed: int, overrides: list[str] | None = None) -> str:
    """The command that reproduces a run."""
    extra = "".join(f" {o}" for o in overrides or [])
    return f"fvq repro run {variant.id} --seed {seed}{extra}"


def _checkpoint_step(run: RunFolder) -> int:
    path = run.latest_checkpoint()
    return 0 if path is None else int(read_checkpoint_entry(path, "step"))


def _read_times(run: RunFolder) -> list[dict[str, Any]]:
    path = run.file(TIME_FILE)
    return json.loads(path.read_text()) if path.is_file() else []


def _add_time(run: RunFolder, entry: dict[str, Any]) -> list[dict[str, Any]]:
    times = _read_times(run) + [entry]
    atomic_write_bytes(run.file(TIME_FILE), (json.dumps(times, indent=1) + "\n").encode())
    return times


def training_curves(run: RunFolder) -> dict[str, dict[str, list[float | None]]]:
    """The run's logged scalars as columns: ``{"validation": {"step": [...], "val/usage": [...], ...},
    "train": {"step": [...], "loss": [...], "quantizer/usage": [...], ...}}``.

    A step logged twice (an interrupted run logs the steps after its last checkpoint again) keeps its last entry.
    """
    rows: dict[str, dict[int, dict[str, float | None]]] = {"validation": {}, "train": {}}
    if run.log_file.is_file():
        for line in run.log_file.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            step = int(entry.pop("step"))
            entry.pop("time", None)
            val = {k: v for k, v in entry.items() if k.startswith("val/")}
            train = {k.removeprefix("train/"): v for k, v in entry.items() if not k.startswith("val/")}
            if val:
                rows["validation"].setdefault(step, {}).update(val)
            if train:
                rows["train"].setdefault(step, {}).update(train)
    out: dict[str, dict[str, list[float | None]]] = {}
    for kind, by_step in rows.items():
        steps = sorted(by_step)
        keys = sorted({k for row in by_step.values() for k in row})
        out[kind] = {"step": [float(s) for s in steps], **{k: [by_step[s].get(k) for s in steps] for k in keys}}
    return out


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_variant(
    variant: Variant,
    seed: int,
    *,
    runs_dir: str | Path = "runs/repro",
    results_dir: str | Path = "results",
    stop_after: int | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    device: str = "cpu",
) -> RunOutcome:
    """Train (or continue) one run, then evaluate it with the protocol and write its summary.

    Args:
        variant: The experiment file.
        seed: The seed (need not be one of ``variant.seeds``).
        runs_dir: Parent of the run folders.
        results_dir: Parent of the summaries.
        stop_after: Stop after this many optimizer steps of this invocation (a checkpoint is written; run again to
            continue), e.g. for time-limited jobs.
        overrides: Extra ``key=value`` config overrides (recorded in the summary's command).
        force: Evaluate and write the summary again even when one exists.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Raises:
        HeldOutTooSmallError: before training, when the held-out set holds too few tokens per code.
        ValueError: ``force`` on a run filed under another experiment (evaluate it again under that name).
    """
    from fvq.data import build_dataset
    from fvq.inference.loading import load_model
    from fvq.models import Tokenizer
    from fvq.training import tokenizer_task
    from fvq.training.config import parse_overrides

    config = run_config(variant, seed, parse_overrides(overrides or []), device)
    protocol = Protocol.from_overrides(variant.protocol)
    key = run_key(config.to_dict(), protocol.as_dict())
    run = RunFolder(Path(runs_dir) / variant.experiment / variant.run_name(seed))
    out_path = summary_path(results_dir, variant, seed)
    found = ResultIndex(results_dir).find(variant, seed, key)
    if found is not None and found.path != out_path:
        if force:
            raise ValueError(
                f"{variant.id} seed {seed} is the run filed as {found.path} (same config, seed and protocol); "
                f"evaluate it again under that name: fvq repro run {found.home} --seed {seed} --force"
            )
        steps = int(found.summary.get("steps", 0))
        home = Path(runs_dir) / found.summary["experiment"] / found.summary["run"]
        return RunOutcome("shared", home, found.path, steps, steps)
    if out_path.is_file() and not force:
        steps = int(json.loads(out_path.read_text()).get("steps", 0))
        return RunOutcome("skipped", run.path, out_path, steps, steps)

    # 1. Refuse a held-out set too small for K before spending any training time on it.
    val_data = heldout_data(config.val_data or config.data, protocol)
    val_set = build_dataset(val_data, split="val")
    probe = Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer})
    image_size = int(val_data.get("image_size", 32))
    check_heldout(len(val_set), tokens_per_image(probe, image_size), probe.codebook_size, protocol)
    if config.epochs is not None:
        raise ValueError(f"{variant.path}: give the run's length as max_steps (epochs is {config.epochs})")
    total_steps = config.max_steps
    del probe

    # 2. Train, or continue from the newest checkpoint (a run folder without one starts over).
    done = _checkpoint_step(run)
    resume = done > 0
    if done < total_steps:
        watch = Stopwatch().start()
        result = tokenizer_task.train(
            config, run.path, resume=resume, max_steps=stop_after, overwrite=not resume and run.path.exists()
        )
        _add_time(run, {"phase": "train", "from_step": done, "to_step": result.steps, **watch.read()})
        done = result.steps
        if done < total_steps:
            return RunOutcome("partial", run.path, None, done, total_steps)

    # 3. The protocol on the final model: restarts counted on the training form, metrics on the inference form.
    watch = Stopwatch().start()
    loaded = load_model(run.path, device=device if device != "auto" else "cpu", export=False)
    restarted = restarted_codes(loaded.tokenizer.quantizer)
    with torch.no_grad():
        inference = loaded.tokenizer.export().eval()
    device_used = inference.quant_conv.weight.device
    result = evaluate_heldout(inference, val_set, protocol, restarted=restarted, device=device_used)
    times = _add_time(run, {"phase": "eval", **watch.read()})

    train_times = [t for t in times if t["phase"] == "train"]
    eval_time = times[-1]
    wall = sum(t["wall_s"] for t in times)
    metrics = {k: v for k, v in result.as_dict().items() if k not in ("usage_curve", "definitions")}
    summary = {
        "summary_version": SUMMARY_VERSION,
        "experiment": variant.experiment,
        "variant": variant.name,
        "label": variant.label,
        "run": variant.run_name(seed),
        "seed": seed,
        "description": variant.description,
        "status": "finished",
        "run_key": key,
        "command": command_line(variant, seed, overrides),
        "experiment_file": f"experiments/{variant.experiment}/{variant.path.name}",
        "experiment_sha256": _file_digest(variant.path),
        "steps": done,
        "metrics": metrics,
        "curves": {"usage_vs_tokens": result.usage_curve, **training_curves(run)},
        "definitions": result.definitions,
        "protocol": protocol.as_dict(),
        "budget": {
            "train_minutes": variant.budget.train_minutes,
            "eval_minutes": variant.budget.eval_minutes,
            "within_budget": wall <= 60 * variant.budget.minutes,
        },
        "time": {
            "wall_s": wall,
            "cpu_s": sum(t["cpu_s"] for t in times),
            "train_wall_s": sum(t["wall_s"] for t in train_times),
            "train_cpu_s": sum(t["cpu_s"] for t in train_times),
            "eval_wall_s": eval_time["wall_s"],
            "eval_cpu_s": eval_time["cpu_s"],
            "invocations": times,
        },
        "machine": machine_info(),
        "git_commit": git_commit(),
        "config": config.to_dict(),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, (json.dumps(summary, indent=1) + "\n").encode())
    return RunOutcome("finished", run.path, out_path, done, total_steps)
