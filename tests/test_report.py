"""``fvq report``: the HTML report of a real (tiny) training run, its figures, missing pieces, and a browser render."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY_TOKENIZER

from fvq.cli import main
from fvq.plots import code_frequency_figure
from fvq.report import build_report, format_metric, markdown_to_html

TINY = [
    *TINY_TOKENIZER,
    "data.samples_per_epoch=16",
    "data.val_samples=16",
    "global_batch_size=8",
    "max_steps=3",
    "val_every=2",
    "checkpoint_every=3",
    "log_every=1",
    "val_batch_size=16",
    "tensorboard=false",
]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class StrictPage(HTMLParser):
    """Collects images, table cells and text, and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.cells: dict[str, tuple[str, str]] = {}  # data-key -> (data-value, text)
        self.text: list[str] = []
        self._cell: tuple[str, str] | None = None
        self._cell_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        if tag == "td" and "data-key" in attrs:
            self._cell, self._cell_text = (attrs["data-key"], attrs["data-value"]), []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.cells[self._cell[0]] = (self._cell[1], "".join(self._cell_text).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell_text.append(data)


def parse_page(path: Path) -> StrictPage:
    page = StrictPage()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], f"unclosed elements: {page.stack}"
    return page


def decode_data_uri(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix) :], validate=True)


def assert_valid_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(data)).verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "tiny_fvq", "--out", str(run), *TINY]) == 0
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report"))
    return dest


def test_report_of_a_real_run(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = run / "report" / "index.html"
    assert str(out) in capsys.readouterr().out
    page = parse_page(out)

    # self-contained: every picture embedded as a PNG data URI; no scripts, stylesheets or remote resources
    assert "script" not in page.tags and "link" not in page.tags
    html_text = out.read_text()
    assert "http://" not in html_text and "https://" not in html_text
    embedded = [decode_data_uri(img["src"]) for img in page.images]
    assert len(embedded) == 4 and all(img.get("alt") for img in page.images)
    for data in embedded:
        width, height = assert_valid_png(data)
        assert width >= 100 and height >= 100
    # the same figures are written as files next to the page, byte for byte
    files = {p.name: p.read_bytes() for p in out.parent.glob("*.png")}
    assert set(files) == {"training_curves.png", "usage.png", "code_frequencies.png", "reconstructions.png"}
    assert sorted(files.values()) == sorted(embedded)
    assert files["reconstructions.png"] == (run / "reconstructions.png").read_bytes()

    # the metrics table holds the values of metrics.json (raw in data-value, formatted for people in the cell)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3
    for key, value in metrics.items():
        if key == "step" or isinstance(value, str):
            continue
        raw, text = page.cells[key]
        assert float(raw) == value, key
        assert text == format_metric(key, value, 64), key
    assert page.cells["val/usage"][1] == f"{metrics['val/usage'] * 100:.2f}%"
    assert page.cells["val/psnr"][1] == f"{metrics['val/psnr']:.2f} dB"
    assert page.cells["val/dead_codes"][1] == str(int(metrics["val/dead_codes"]))
    text = " ".join(page.text)
    assert metrics["usage_definition"] in text
    # the config and the checkpoints are shown; no evaluation yet is said, not failed on
    assert "codebook_size: 64" in text and "step_00000003.pt" in text
    assert "No evaluation yet" in text
    assert "No validation yet" not in text


EVAL = {  # the layout of fvq.evaluation.EvalResult.to_dict()
    "metrics": {"psnr_rgb": 21.875, "psnr_y": 23.5, "ssim": 0.6125, "usage": 0.5, "dead_codes": 32.0, "rfid": 123.5},
    "protocol": "embedded",
    "protocol_description": "fixed held-out crops",
    "reference": "",
    "dataset": "embedded held-out photos (16 crops of 16 px)",
    "image_size": 16,
    "num_images": 16,
    "notes": {"psnr_y": "BT.601 luma, 8-bit", "rfid": "pinned FID Inception"},
    "info": {"device": "cpu", "seconds": 1.5},
}


def test_report_with_eval_metrics_and_custom_out(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(EVAL))
    (run / "eval" / "metrics.md").write_text(
        '# Evaluation\n\n| metric | value | protocol |\n| --- | --- | --- |\n| PSNR-Y | 23.50 | `psnr(channel="y")` |\n'
        "\n- SSIM uses **data range 1** <b>not bold</b>\n"
    )
    out = tmp_path / "mail" / "run.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = parse_page(out)
    assert page.cells["psnr_y"] == ("23.5", "23.50 dB")
    assert page.cells["ssim"] == ("0.6125", "0.6125")
    assert page.cells["usage"] == ("0.5", "50.00%")
    assert page.cells["dead_codes"] == ("32.0", "32")
    text = " ".join(page.text)
    # the protocol and each metric's definition are shown next to the numbers
    for words in ("BT.601 luma, 8-bit", "pinned FID Inception", "fixed held-out crops", "16 crops of 16 px"):
        assert words in text
    assert "No evaluation yet" not in text
    html_text = out.read_text()
    assert html_text.index("data-key='rfid'") < html_text.index("data-key='psnr_rgb'")  # headline metric first
    assert "<code>psnr(channel=&quot;y&quot;)</code>" in html_text and "<strong>data range 1</strong>" in html_text
    assert "<b>not bold</b>" not in html_text  # markdown is escaped, never passed through as HTML
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["run.html", "training_curves.png", "usage.png", "code_frequencies.png", "reconstructions.png"]
    )


def test_report_reads_what_fvq_eval_writes(tiny_run, tmp_path):
    evaluate = pytest.importorskip("fvq.evaluation.evaluate", reason="fvq.evaluation.evaluate is not available")
    run = copy_run(tiny_run, tmp_path / "run")
    fields = {
        key: value for key, value in EVAL.items() if key in {f.name for f in dataclasses.fields(evaluate.EvalResult)}
    }
    evaluate.EvalResult(**fields).save(run / "eval")
    page = parse_page(build_report(run))
    assert page.cells["psnr_rgb"] == ("21.875", "21.88 dB") and page.cells["rfid"] == ("123.5", "123.5")
    assert "pinned FID Inception" in " ".join(page.text)


def test_report_of_an_unknown_eval_layout(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"psnr": 20.0, "scores": {"fid": 5.25}, "note": "custom"}))
    page = parse_page(build_report(run))
    assert page.cells["psnr"] == ("20.0", "20.00 dB") and page.cells["scores/fid"] == ("5.25", "5.25")
    assert "custom" in " ".join(page.text)


def test_report_before_the_first_validation(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    assert len(list(build_report(run).parent.glob("*.png"))) == 4  # an earlier build, with every figure
    for name in ("metrics.json", "val_code_counts.pt", "reconstructions.png"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    kept = [r for r in records if "val/usage" not in r]
    assert len(kept) < len(records)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 9, "trai')  # partial line
    out = build_report(run)
    page = parse_page(out)
    text = " ".join(page.text)
    assert "No validation yet" in text and "No held-out code histogram yet" in text and "No reconstructions yet" in text
    assert "skipped 1 unreadable line" in text
    assert len(page.images) == 2  # training curves and batch usage only
    for img in page.images:
        assert_valid_png(decode_data_uri(img["src"]))
    # the figures whose data is gone are removed, not left stale next to the page
    assert sorted(p.name for p in out.parent.glob("*.png")) == ["training_curves.png", "usage.png"]


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "config.yaml" in err and "notes.txt" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("max_steps: 3\n")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report.png")]) == 2
    assert "must be an .html file" in capsys.readouterr().err
    # a run with only its config (training not started) still renders, saying what is missing
    assert main(["report", str(tmp_path / "run")]) == 0
    text = " ".join(parse_page(tmp_path / "run" / "report" / "index.html").text)
    assert "No training steps logged yet" in text and "No validation yet" in text


def test_code_frequency_figure_checks_its_histogram():
    fig = code_frequency_figure(torch.tensor([5, 0, 3, 0, 1, 0, 0, 7]))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    drawn = ax.lines[0].get_ydata()  # sorted shares of the used codes, most used first
    np.testing.assert_allclose(drawn, [7 / 16, 5 / 16, 3 / 16, 1 / 16])
    assert ax.lines[1].get_ydata()[0] == pytest.approx(1 / 8)  # the uniform level
    assert any("4 dead codes" in t.get_text() for t in ax.texts)
    for bad, message in [
        (torch.zeros(2, 4, dtype=torch.long), "1-D code histogram"),
        (torch.ones(4), "integer code counts"),
        (torch.tensor([1, -1]), "non-negative"),
        (torch.zeros(4, dtype=torch.long), "empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            code_frequency_figure(bad)


def test_markdown_subset_is_escaped():
    out = markdown_to_html("## Notes\n\n<script>alert(1)</script> and `a<b`\n\n1. first\n2. second\n")
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "<h4>Notes</h4>" in out and "<code>a&lt;b</code>" in out and "<ol><li>first</li><li>second</li></ol>" in out


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium) for the headless render")
def test_report_renders_in_a_headless_browser(tiny_run, tmp_path):
    out = build_report(copy_run(tiny_run, tmp_path / "run"))
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        out.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    assert shot.is_file()
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    # the page is drawn (not blank) and the embedded figures are displayed: the plots' blue (#4C72B0) and orange
    # (#DD8452) lines exist only inside the figures
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    for colour in ((0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52)):
        near = (np.abs(pixels - np.array(colour)).sum(axis=-1) < 24).sum()
        assert near > 200, colour
