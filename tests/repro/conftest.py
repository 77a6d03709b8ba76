"""A tiny experiment folder for the reproduction-suite tests."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_EXPERIMENT = """\
# Tiny: plain VQ, K = 64 x 16, a few steps
base: tiny_vq
label: tiny VQ
paper: "none"
overrides:
  quantizer: {codebook_size: 64, codebook_dim: 16}
  data: {val_samples: 8, samples_per_epoch: 16}
  global_batch_size: 4
  max_steps: 3
  log_every: 1
  val_every: 3
  checkpoint_every: 1
  val_batch_size: 8
  val_psnr_images: 4
  tensorboard: false
seeds: [0]
budget: {train_minutes: 1, eval_minutes: 0.5}
# an explicit override for a test: 8 held-out tokens per code instead of 64
protocol: {min_tokens_per_code: 8, image_metric_images: 4, batch_size: 4, heldout_samples: 8}
"""


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    """``tmp_path`` holding ``experiments/tiny/vq_k64.yaml``."""
    folder = tmp_path / "experiments" / "tiny"
    folder.mkdir(parents=True)
    (folder / "vq_k64.yaml").write_text(TINY_EXPERIMENT)
    return tmp_path
