"""A self-contained HTML report of a training run (``fvq report RUN``).

The report reads what :mod:`fvq.training` writes into a run directory (:mod:`fvq.runs`) (``config.yaml``, ``log.jsonl``,
``metrics.json``, ``reconstructions.png``, ``val_code_counts.pt``, ``checkpoints/``) and, when present, what
``fvq eval`` writes (``eval/metrics.json``, ``eval/metrics.md``). It draws the figures of :mod:`fvq.plots` and writes
one HTML file in which every picture is embedded as a base64 ``data:`` URI (so the single file can be mailed or
attached to an issue), next to the same pictures as PNG files. Pieces that a run does not have yet (no validation,
no evaluation) are named in the page instead of failing.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fvq.runs import CHECKPOINT_PATTERN, list_checkpoints
from fvq.training.logging import read_log

if TYPE_CHECKING:
    import torch

RUN_FILES = ("config.yaml", "log.jsonl", "metrics.json")
FIGURE_FILES = ("training_curves.png", "usage.png", "code_frequencies.png", "reconstructions.png")

# label, format kind and a one-line explanation of each validation figure written by ``Trainer.validate``
_VAL_ROWS: dict[str, tuple[str, str, str]] = {
    "val/usage": ("Codebook usage", "percent", "codes used at least once over the whole held-out set"),
    "val/perplexity": ("Perplexity", "perplexity", "exp(entropy) of the held-out code histogram; K = uniform use"),
    "val/dead_codes": ("Dead codes", "int", "codes never used on the held-out set"),
    "val/psnr": ("PSNR", "db", "RGB PSNR on 8-bit images, mean over the decoded held-out images"),
    "val/tokens": ("Tokens", "int", "held-out tokens counted"),
    "val/images": ("Images", "int", "held-out images (all counted for usage)"),
    "val/psnr_images": ("Decoded images", "int", "held-out images decoded for PSNR (the first ones)"),
    "val/replicas_in_sync": ("Replicas in sync", "bool", "all ranks hold bit-identical weights and codebooks"),
}


@dataclass
class RunContents:
    """What was found in a run directory (each piece None when absent or unreadable).

    Attributes:
        run_dir: The run directory.
        config: ``config.yaml`` as plain data.
        config_text: ``config.yaml`` as written.
        records: Records of ``log.jsonl`` (empty when there is no log).
        metrics: ``metrics.json`` (latest validation).
        code_counts: ``val_code_counts.pt``, the held-out code histogram ``(K,)`` int64.
        reconstructions: Path of ``reconstructions.png``.
        eval_metrics: ``eval/metrics.json`` from ``fvq eval``.
        eval_markdown: ``eval/metrics.md`` from ``fvq eval``.
        checkpoints: ``checkpoints/step_*.pt``, oldest first.
        notes: Problems met while reading (shown in the report).
    """

    run_dir: Path
    config: dict[str, Any] | None = None
    config_text: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    code_counts: torch.Tensor | None = None
    reconstructions: Path | None = None
    eval_metrics: dict[str, Any] | None = None
    eval_markdown: str | None = None
    checkpoints: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def codebook_size(self) -> int | None:
        """K from the config, else from the code histogram."""
        size = ((self.config or {}).get("quantizer") or {}).get("codebook_size")
        if isinstance(size, int) and size > 0:
            return size
        return int(self.code_counts.numel()) if self.code_counts is not None else None

    @property
    def last_step(self) -> int | None:
        """The newest step seen in the log, the checkpoints or the metrics."""
        steps = [int(r["step"]) for r in self.records if isinstance(r.get("step"), (int, float))]
        steps += [int(m) for p in self.checkpoints if (m := _checkpoint_step(p)) is not None]
        if self.metrics and isinstance(self.metrics.get("step"), (int, float)):
            steps.append(int(self.metrics["step"]))
        return max(steps) if steps else None


def _checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def _read_records(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """``log.jsonl`` records; a run still being written may end in a partial line, which is skipped with a note."""
    try:
        return [r for r in read_log(path) if isinstance(r, dict)]
    except json.JSONDecodeError:
        records, bad = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
        notes.append(f"log.jsonl: skipped {bad} unreadable line(s)")
        return records


def _read_json(path: Path, notes: list[str], name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        notes.append(f"{name}: could not be read ({err})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{name}: expected a JSON object, found {type(data).__name__}")
        return None
    return data


def load_run(run_dir: str | Path) -> RunContents:
    """Read everything the report uses from a run directory of ``fvq train``.

    Args:
        run_dir: The run directory (the ``--out`` of ``fvq train``).

    Returns:
        :class:`RunContents`; missing pieces are None and unreadable ones are listed in ``notes``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: ``run_dir`` is not a directory or holds none of ``config.yaml``, ``log.jsonl``, ``metrics.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"expected a run directory (the --out of fvq train), got the file {run_dir}")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        found = sorted(p.name for p in run_dir.iterdir())[:10]
        raise ValueError(
            f"{run_dir} is not a run directory of fvq train: expected {', '.join(RUN_FILES)} in it, found "
            f"{found if found else 'nothing'}"
        )
    run = RunContents(run_dir=run_dir)
    notes = run.notes

    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        run.config_text = config_path.read_text()
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as err:
            notes.append(f"config.yaml: could not be parsed ({err})")
    if (run_dir / "log.jsonl").is_file():
        run.records = _read_records(run_dir / "log.jsonl", notes)
    if (run_dir / "metrics.json").is_file():
        run.metrics = _read_json(run_dir / "metrics.json", notes, "metrics.json")
    counts_path = run_dir / "val_code_counts.pt"
    if counts_path.is_file():
        import torch

        try:
            counts = torch.load(counts_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt file is reported in the page, not fatal
            notes.append(f"val_code_counts.pt: could not be loaded ({type(err).__name__}: {err})")
        else:
            if isinstance(counts, torch.Tensor) and counts.ndim == 1 and not counts.is_floating_point():
                run.code_counts = counts
            else:
                what = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
                notes.append(f"val_code_counts.pt: expected a 1-D integer tensor (K,), found {what}")
    if (run_dir / "reconstructions.png").is_file():
        run.reconstructions = run_dir / "reconstructions.png"
    if (run_dir / "eval" / "metrics.json").is_file():
        run.eval_metrics = _read_json(run_dir / "eval" / "metrics.json", notes, "eval/metrics.json")
    if (run_dir / "eval" / "metrics.md").is_file():
        run.eval_markdown = (run_dir / "eval" / "metrics.md").read_text()
    if (run_dir / "checkpoints").is_dir():
        run.checkpoints = list_checkpoints(run_dir / "checkpoints")
    return run


# ---------------------------------------------------------------------------------------------------------------------
# formatting


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_metric(key: str, value: Any, codebook_size: int | None = None) -> str:
    """A metric value as text for people: usage as a percentage, PSNR in dB, counts with thousands separators.

    Args:
        key: The metric's name, e.g. ``"val/usage"``.
        value: Its value (numbers are formatted; anything else is shown as text).
        codebook_size: K, to show perplexity as a fraction of K.

    Returns:
        The formatted text.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value) if not isinstance(value, (dict, list)) else json.dumps(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    kind = _VAL_ROWS.get(key, ("", _guess_kind(key), ""))[1]
    if kind == "percent":
        return f"{value:.2%}"
    if kind == "perplexity":
        return f"{value:,.1f}" + (f" ({value / codebook_size:.1%} of K)" if codebook_size else "")
    if kind == "db":
        return f"{value:.2f} dB"
    if kind == "int" and value.is_integer():
        return f"{int(value):,}"
    if kind == "bool":
        return "yes" if value else "no"
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _guess_kind(key: str) -> str:
    name = key.rsplit("/", 1)[-1].lower()
    if "usage" in name or "utilization" in name:
        return "percent" if not name.endswith("_codes") else "int"
    if "perplexity" in name:
        return "perplexity"
    if "psnr" in name:
        return "db"
    if name in {"dead_codes", "tokens", "images", "num_images", "num_tokens", "step", "dead"}:
        return "int"
    return "number"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _inline_markdown(text: str) -> str:
    out = _esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)


def markdown_to_html(text: str) -> str:
    """A small, safe Markdown subset as HTML: headings, pipe tables, lists, fenced code, paragraphs.

    All text is escaped; inline ``code``, ``**bold**`` and ``*italic*`` are kept. Enough for the tables and protocol
    notes that ``fvq eval`` writes, with no dependency and no raw HTML passed through.

    Args:
        text: Markdown source.

    Returns:
        HTML fragment.
    """
    lines = text.splitlines()
    parts: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            i += 1
            parts.append(f"<pre>{_esc(chr(10).join(block))}</pre>")
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            level = min(len(m.group(1)) + 2, 6)  # the report's own h1/h2 stay above
            parts.append(f"<h{level}>{_inline_markdown(m.group(2))}</h{level}>")
            i += 1
        elif stripped.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            is_rule = len(rows) > 1 and all(re.fullmatch(r":?-{1,}:?", c) for c in rows[1] if c)
            head, body = (rows[0], rows[2:]) if is_rule else (None, rows)
            table = ["<table class='data'>"]
            if head is not None:
                table.append("<thead><tr>" + "".join(f"<th>{_inline_markdown(c)}</th>" for c in head) + "</tr></thead>")
            table.append("<tbody>")
            for row in body:
                table.append("<tr>" + "".join(f"<td>{_inline_markdown(c)}</td>" for c in row) + "</tr>")
            table.append("</tbody></table>")
            parts.append("".join(table))
        elif re.match(r"^([-*+]|\d+\.)\s+", stripped):
            ordered = bool(re.match(r"^\d+\.", stripped))
            items = []
            while i < len(lines) and re.match(r"^\s*([-*+]|\d+\.)\s+", lines[i]):
                items.append(re.sub(r"^\s*([-*+]|\d+\.)\s+", "", lines[i]))
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():  # continuation lines
                    items[-1] += " " + lines[i].strip()
                    i += 1
            tag = "ol" if ordered else "ul"
            parts.append(f"<{tag}>" + "".join(f"<li>{_inline_markdown(t)}</li>" for t in items) + f"</{tag}>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^\s*(#|\||```|[-*+]\s|\d+\.\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            if not para:  # a line that looked like a block start but was not one
                para.append(stripped)
                i += 1
            parts.append(f"<p>{_inline_markdown(' '.join(para))}</p>")
    return "\n".join(parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------------
# page sections


def _figure(png: bytes, alt: str, caption: str, css_class: str = "") -> str:
    cls = f" class='{css_class}'" if css_class else ""
    return f"<figure{cls}><img src='{_data_uri(png)}' alt='{_esc(alt)}'><figcaption>{caption}</figcaption></figure>"


def _missing(text: str) -> str:
    return f"<p class='missing'>{text}</p>"


def _summary_cards(run: RunContents) -> str:
    m = run.metrics or {}
    k = run.codebook_size
    cards = []

    def card(label: str, value: str, sub: str = "") -> None:
        cards.append(
            f"<div class='card'><div class='label'>{_esc(label)}</div><div class='value'>{_esc(value)}</div>"
            f"<div class='sub'>{_esc(sub)}</div></div>"
        )

    total = (run.config or {}).get("max_steps") if (run.config or {}).get("epochs") is None else None
    last = run.last_step
    card("Steps", f"{last:,}" if last is not None else "none", f"of {total:,}" if isinstance(total, int) else "")
    if "val/usage" in m:
        card("Held-out usage", format_metric("val/usage", m["val/usage"]), f"K = {k:,}" if k else "")
    if "val/perplexity" in m:
        ppl = float(m["val/perplexity"])
        card("Perplexity", f"{ppl:,.1f}", f"{ppl / k:.1%} of K" if k else "")
    if "val/dead_codes" in m:
        card("Dead codes", format_metric("val/dead_codes", m["val/dead_codes"]), "never used on held-out")
    if "val/psnr" in m:
        card("PSNR", format_metric("val/psnr", m["val/psnr"]), "held-out, RGB")
    return "<div class='cards'>" + "".join(cards) + "</div>"


def _facts(run: RunContents) -> str:
    cfg = run.config or {}
    q = cfg.get("quantizer") or {}
    projector = q.get("projector")
    projector_name = projector.get("type") if isinstance(projector, dict) else projector
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    rows = [
        ("Run directory", f"<code>{_esc(run.run_dir.resolve())}</code>"),
        (
            "Quantizer",
            _esc(
                f"{q.get('type', '?')}, K = {q.get('codebook_size', '?')}, D = {q.get('codebook_dim', '?')}"
                + (f", projector {projector_name}" if projector_name else "")
            ),
        ),
        ("Model", _esc(model.get("preset", "custom") if isinstance(model, dict) else model)),
        ("Data", _esc(f"{data.get('type', '?')}, {data.get('image_size', '?')} px") if data else "?"),
        ("Global batch", _esc(cfg.get("global_batch_size", "?"))),
    ]
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        rows.append(("Logged span", _esc(_duration(max(times) - min(times)))))
    ips = [r["train/images_per_s"] for r in run.records if isinstance(r.get("train/images_per_s"), (int, float))]
    if ips:
        rows.append(("Throughput", _esc(f"{ips[-1]:,.1f} images/s (last logged step)")))
    if run.checkpoints:
        names = ", ".join(f"<code>{_esc(p.name)}</code>" for p in run.checkpoints)
        rows.append(("Checkpoints", names))
    else:
        rows.append(("Checkpoints", "none yet"))
    body = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    return f"<dl class='facts'>{body}</dl>"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _validation_table(run: RunContents) -> str:
    m = run.metrics
    if not m:
        return _missing(
            "No validation yet: <code>metrics.json</code> is written at the first validation "
            "(every <code>val_every</code> steps and at the end of training)."
        )
    k = run.codebook_size
    keys = [key for key in _VAL_ROWS if key in m] + sorted(
        key for key in m if key not in _VAL_ROWS and key != "step" and isinstance(m[key], (int, float))
    )
    rows = [
        _metric_row(key, m[key], _VAL_ROWS.get(key, (key,))[0], _VAL_ROWS.get(key, ("", "", ""))[2], k) for key in keys
    ]
    texts = [(key, value) for key, value in m.items() if isinstance(value, str)]
    notes = "".join(f"<li><code>{_esc(key)}</code>: {_esc(value)}</li>" for key, value in texts)
    step = m.get("step")
    head = f"<p>Latest validation, at step <strong>{_esc(step)}</strong> (<code>metrics.json</code>).</p>"
    table = _metric_table(rows)
    return head + table + (f"<ul class='notes'>{notes}</ul>" if notes else "")


_EVAL_LABELS = {
    "rfid": "rFID",
    "lpips_vgg": "LPIPS (VGG)",
    "lpips_alex": "LPIPS (AlexNet)",
    "psnr": "PSNR",
    "psnr_rgb": "PSNR (RGB)",
    "psnr_y": "PSNR (Y)",
    "ssim": "SSIM",
    "ssim_dr2": "SSIM (data_range=2)",
    "usage": "Codebook usage",
    "perplexity": "Perplexity",
    "dead_codes": "Dead codes",
    "tokens": "Tokens",
    "exact_images": "Exact reconstructions",
    "num_images": "Images",
}


def _metric_row(key: str, value: Any, label: str, note: str, codebook_size: int | None) -> str:
    return (
        f"<tr><td>{_esc(label)}</td><td class='num' data-key='{_esc(key)}' data-value='{_esc(repr(value))}'>"
        f"{_esc(format_metric(key, value, codebook_size))}</td><td><code>{_esc(key)}</code></td>"
        f"<td class='note'>{_esc(note)}</td></tr>"
    )


def _metric_table(rows: list[str], definition: str = "Definition") -> str:
    return (
        "<table class='data'><thead><tr><th>Metric</th><th>Value</th><th>Key</th>"
        f"<th>{definition}</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _eval_section(run: RunContents) -> str:
    if run.eval_metrics is None and run.eval_markdown is None:
        return _missing(
            "No evaluation yet: run <code>fvq eval</code> on this run to add reconstruction metrics (PSNR, SSIM, "
            "LPIPS, rFID) under their protocols; this section then shows <code>eval/metrics.json</code> and "
            "<code>eval/metrics.md</code>."
        )
    parts = []
    data = run.eval_metrics
    k = run.codebook_size
    structured = data is not None and isinstance(data.get("metrics"), dict)
    if structured:  # the layout of ``fvq.evaluation.EvalResult.to_dict()``
        metrics, notes = data["metrics"], data.get("notes") if isinstance(data.get("notes"), dict) else {}
        facts = []
        if data.get("dataset"):
            facts.append(("Data", _esc(data["dataset"])))
        if data.get("protocol"):
            described = f" ({data['protocol_description']})" if data.get("protocol_description") else ""
            facts.append(("Protocol", f"<strong>{_esc(data['protocol'])}</strong>{_esc(described)}"))
        for key, label in (("image_size", "Image size S"), ("num_images", "Images"), ("reference", "rFID reference")):
            if data.get(key) not in (None, ""):
                facts.append((label, _esc(format_metric(key, data[key]))))
        if facts:
            parts.append("<dl class='facts wide'>" + "".join(f"<dt>{a}</dt><dd>{b}</dd>" for a, b in facts) + "</dl>")
        order = list(_EVAL_LABELS)
        keys = sorted(metrics, key=lambda name: order.index(name) if name in order else len(order))
        rows = [_metric_row(key, metrics[key], _EVAL_LABELS.get(key, key), str(notes.get(key, "")), k) for key in keys]
        if rows:
            parts.append(_metric_table(rows, "Protocol / definition"))
        known = {"metrics", "notes", "dataset", "protocol", "protocol_description", "image_size", "num_images"}
        extra = {key: v for key, v in data.items() if key not in known | {"reference", "info"}}
    else:
        extra = data or {}
    if extra:
        flat = _flatten(extra)
        numbers = [(key, v) for key, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        texts = [(key, v) for key, v in flat.items() if (key, v) not in numbers]
        if numbers:
            parts.append(_metric_table([_metric_row(key, v, key.rsplit("/", 1)[-1], "", k) for key, v in numbers]))
        if texts:
            items = "".join(
                f"<li><code>{_esc(key)}</code>: {_esc(v if isinstance(v, str) else json.dumps(v))}</li>"
                for key, v in texts
            )
            parts.append(f"<ul class='notes'>{items}</ul>")
    info = data.get("info") if structured else None
    if isinstance(info, dict) and info:
        items = "".join(
            f"<li><code>{_esc(key)}</code>: {_esc(v if isinstance(v, str) else json.dumps(v))}</li>"
            for key, v in info.items()
            if v is not None
        )
        parts.append(f"<details><summary>How the evaluation ran</summary><ul class='notes'>{items}</ul></details>")
    if run.eval_markdown is not None:
        parts.append(
            f"<details{'' if structured else ' open'}><summary><code>eval/metrics.md</code> as written</summary>"
            f"<div class='markdown'>{markdown_to_html(run.eval_markdown)}</div></details>"
        )
    return "\n".join(parts)


_CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #e2e6eb; --bg: #f6f7f9; --accent: #3b6fb6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
header .meta { color: var(--muted); font-size: 13px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px; margin: 18px 0; }
section h2 { font-size: 18px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f3f6;
  padding: 1px 4px; border-radius: 4px; }
pre { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f6f8fa;
  border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; overflow: auto; max-height: 560px; margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 12px; margin: 18px 0 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .value { font-size: 24px; font-weight: 600; margin-top: 2px; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12.5px; min-height: 1em; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
table.data th, table.data td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); }
table.data thead th { background: #f1f3f6; font-weight: 600; font-size: 13px; }
table.data tbody tr:nth-child(even) { background: #fafbfc; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; font-weight: 600; }
td.note { color: var(--muted); font-size: 13px; }
dl.facts { display: grid; grid-template-columns: max-content minmax(0, 1fr) max-content minmax(0, 1fr);
  gap: 6px 16px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0 16px 0 0; overflow-wrap: anywhere; }
dl.facts.wide { grid-template-columns: max-content minmax(0, 1fr); margin-bottom: 12px; }
pre.config { column-count: 3; column-gap: 28px; column-rule: 1px solid var(--line); max-height: none; }
@media (max-width: 900px) { dl.facts { grid-template-columns: max-content minmax(0, 1fr); }
  pre.config { column-count: 1; } }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure.pixels img { image-rendering: pixelated; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 8px; }
.missing { color: #8a5a00; background: #fff8e6; border: 1px solid #f3dfa8; border-radius: 8px; padding: 10px 12px;
  margin: 0; }
ul.notes { color: var(--muted); font-size: 13px; padding-left: 20px; }
.two { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 18px; }
@media (max-width: 900px) { .two { grid-template-columns: minmax(0, 1fr); } }
details summary { cursor: pointer; color: var(--muted); margin-bottom: 8px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a training run, with its figures embedded and also saved as PNG files.

    Args:
        run_dir: The run directory written by ``fvq train`` (``config.yaml``, ``log.jsonl``, ``metrics.json``, ...).
        out: The HTML file to write; ``RUN/report/index.html`` by default. The PNG files go into its folder.

    Returns:
        The path of the HTML file.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: ``run_dir`` is not a run directory, or ``out`` is not an ``.html`` file path.
    """
    from fvq import plots
    from fvq.version import __version__

    run = load_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "report" / "index.html"
    if out.suffix.lower() not in {".html", ".htm"}:
        raise ValueError(f"--out must be an .html file, got {out}")
    if out.is_dir():
        raise ValueError(f"--out must be a file path, got the directory {out}")
    fig_dir = out.parent
    fig_dir.mkdir(parents=True, exist_ok=True)
    k = run.codebook_size

    written: set[str] = set()

    def png(fig: Any, name: str) -> bytes:
        data = plots.figure_png(fig, fig_dir / name)
        fig.clear()
        written.add(name)
        return data

    has_train = any("train/loss" in r or "train/lr" in r for r in run.records)
    has_usage = any("quantizer/usage" in r or "val/usage" in r for r in run.records)
    has_val = any("val/usage" in r for r in run.records)

    # training curves
    if has_train:
        curves = _figure(
            png(plots.training_curves_figure(run.records), "training_curves.png"),
            "loss and learning-rate curves",
            "Left: generator loss terms per logged step (log scale). Right: learning rate "
            "(<code>train/lr</code>); the right axis is the annealing factor <code>train/lr_factor</code> "
            "(warmup, constant, decay).",
        )
    else:
        curves = _missing("No training steps logged yet (<code>log.jsonl</code> is missing or empty).")

    # usage over training
    if has_usage:
        usage = _figure(
            png(plots.usage_figure(run.records, k), "usage.png"),
            "codebook usage and perplexity over training",
            "Blue: one training batch (<code>quantizer/usage</code>, <code>quantizer/perplexity</code>), bounded by "
            "the batch's token count. Orange: the whole held-out set at each validation (<code>val/usage</code>, "
            "<code>val/perplexity</code>)."
            + ("" if has_val else " <strong>No validation yet</strong>: held-out points appear after the first."),
        )
    else:
        usage = _missing("No usage figures logged yet.")

    # code-frequency histogram
    if run.code_counts is not None and int(run.code_counts.sum()) > 0:
        step = (run.metrics or {}).get("step")
        codes = _figure(
            png(
                plots.code_frequency_figure(
                    run.code_counts,
                    title="Held-out code frequencies" + (f" (step {step})" if step is not None else ""),
                ),
                "code_frequencies.png",
            ),
            "sorted held-out code frequencies",
            "Codes sorted from most to least used on the held-out set (<code>val_code_counts.pt</code>), as the "
            "share of all held-out tokens, log scale. Dashed: uniform use, 1/K. Shaded: dead codes (never used).",
        )
    else:
        codes = _missing(
            "No held-out code histogram yet (<code>val_code_counts.pt</code> is written at each validation)."
        )

    # reconstructions
    if run.reconstructions is not None:
        grid = run.reconstructions.read_bytes()
        (fig_dir / "reconstructions.png").write_bytes(grid)
        written.add("reconstructions.png")
        recon = _figure(
            grid,
            "held-out originals and reconstructions",
            "Held-out images at the latest validation (<code>reconstructions.png</code>). Rows 1, 3, ...: "
            "originals; rows 2, 4, ...: their reconstructions, each directly below its original.",
            "pixels",
        )
    else:
        recon = _missing("No reconstructions yet (<code>reconstructions.png</code> is written at each validation).")

    config_html = (
        f"<pre class='config'>{_esc(run.config_text)}</pre>"
        if run.config_text is not None
        else _missing("No config.yaml.")
    )
    notes_html = (
        "<section><h2>Notes</h2><ul class='notes'>"
        + "".join(f"<li>{_esc(n)}</li>" for n in run.notes)
        + "</ul></section>"
        if run.notes
        else ""
    )
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"fvq run report: {run.run_dir.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="fvq {_esc(__version__)}">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>{_esc(title)}</h1>
<div class="meta">generated {_esc(now)} by <code>fvq report</code> (fvq {_esc(__version__)})</div>
{_summary_cards(run)}
</header>
<section id="run"><h2>Run</h2>{_facts(run)}</section>
<section id="metrics"><h2>Metrics</h2>
<h3>Validation</h3>
{_validation_table(run)}
<h3>Evaluation (<code>fvq eval</code>)</h3>
{_eval_section(run)}
</section>
<section id="training"><h2>Training curves</h2>{curves}</section>
<section id="usage"><h2>Codebook usage over training</h2>{usage}</section>
<section id="codes"><h2>Held-out code frequencies</h2>{codes}</section>
<section id="reconstructions"><h2>Reconstructions</h2>{recon}</section>
<section id="config"><h2>Config</h2>
<details open><summary><code>config.yaml</code></summary>{config_html}</details></section>
{notes_html}
<footer>{_esc(run.run_dir.resolve())}</footer>
</main>
</body>
</html>
"""
    out.write_text(page, encoding="utf-8")
    for name in set(FIGURE_FILES) - written:  # a figure of an earlier build whose data is gone now
        (fig_dir / name).unlink(missing_ok=True)
    return out
