"""Sampling class-conditional token grids from a :class:`~fvq.generation.gpt.GPT`.

One step per token: the model's logits for the next token, classifier-free guidance, then temperature, top-k, top-p
and a draw (or argmax when ``temperature == 0``). As in LlamaGen's ``generate.py`` (after gpt-fast):

* Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) runs the conditional and the
  null-class sequences in ONE batch of ``2B``; the guided logits are ``u + s (c - u)`` on raw logits, and the one
  token drawn from them is fed to both halves.
* Filtering follows LlamaGen (HF ``top_k_top_p_filtering``): logits are divided by the temperature, top-k keeps the
  tokens whose logit reaches the k-th largest, top-p keeps the most probable tokens up to and including the first at
  which the cumulative probability exceeds ``top_p``. At least one token is always kept.

Reproducibility: every random number comes from a counter-based hash of ``(seed, sample index, position, token
id)``, turned into Gumbel noise and added to the filtered logits (``argmax(logits / T + g)`` is a draw from
``softmax(logits / T)``). A sample's tokens therefore depend only on ``seed`` and its global index
``sample_offset + i``: not on the batch size, on the other samples of the batch, or on how a run is split across
processes (up to floating-point differences in the model's logits between batch shapes, which can only change a draw
at a near-exact tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fvq.generation.gpt import GPT

CFG_SCHEDULES = ("constant", "linear", "interval")
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------------
# guidance
def guidance_scale(
    position: int,
    num_positions: int,
    *,
    scale: float,
    schedule: str = "constant",
    interval: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Guidance scale for the token at ``position`` (0-based) of ``num_positions``.

    Schedules:
        ``constant``: ``scale`` everywhere.
        ``linear``: ``1 + (scale - 1) * position / num_positions``: no guidance at the first token, growing linearly.
        ``interval``: ``scale`` for ``interval[0] <= position / num_positions < interval[1]``, 1 (no guidance)
        elsewhere; ``(0, 0.5)`` guides the first half of the tokens only.
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    if not 0 <= position < num_positions:
        raise ValueError(f"position must be in [0, {num_positions}), got {position}")
    if schedule == "constant":
        return float(scale)
    fraction = position / num_positions
    if schedule == "linear":
        return 1.0 + (float(scale) - 1.0) * fraction
    start, end = interval
    return float(scale) if start <= fraction < end else 1.0


def apply_guidance(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``u + s (c - u)``; ``s = 1`` returns the conditional logits exactly, ``s = 0`` the
    unconditional ones. Shapes ``(B, V)``."""
    if scale == 1.0:
        return cond_logits
    return uncond_logits + scale * (cond_logits - uncond_logits)


# ---------------------------------------------------------------------------------------------------------------------
# filtering and drawing
def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set the logits of tokens outside the top-k / top-p sets to ``-inf`` (a new tensor; the input is unchanged).

    Args:
        logits: ``(B, V)``, already divided by the temperature.
        top_k: Keep tokens whose logit is at least the k-th largest (ties kept); 0 keeps all.
        top_p: Keep the most probable tokens until the cumulative probability exceeds ``top_p`` (that token
            included); 1 keeps all. The most probable token is always kept.

    Returns:
        ``(B, V)``.
    """
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V) each
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)  # mass ahead
        remove_sorted = before > top_p  # (B, V); position 0 has nothing ahead, so it is always kept
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # (B, V) in token order
        logits = logits.masked_fill(remove, float("-inf"))  # (B, V)
    return logits


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 for x in [0, 2**32), in int64 without overflow: multiply by c's two 16-bit halves
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    # lowbias32 integer hash (C. Wellons, "Prospecting for hash functions", 2018): a bijection of [0, 2**32)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor(x & _MASK32, dtype=torch.int64)))


def gumbel_noise(seed: int, sample_indices: Tensor, position: int, vocab_size: int) -> Tensor:
    """Standard Gumbel noise that is a pure function of ``(seed, sample index, position, token id)``.

    Args:
        seed: Any int.
        sample_indices: ``(B,)`` int64 global sample indices (``>= 0``); the noise is computed on their device.
        position: Token position ``t``.
        vocab_size: ``V``.

    Returns:
        ``(B, V)`` fp32: row ``i`` depends only on ``(seed, sample_indices[i], position)``.
    """
    device = sample_indices.device
    seed64 = seed & 0xFFFFFFFFFFFFFFFF
    key = _mix32_int(_mix32_int(seed64 & _MASK32) ^ (seed64 >> 32))
    key = _mix32_int(key ^ _mix32_int(position ^ 0x9E3779B9))
    indices = sample_indices.to(torch.int64)
    rows = _mix32(_mix32(indices & _MASK32) ^ key)  # (B,)
    rows = _mix32(rows ^ ((indices >> 32) & _MASK32))  # (B,)
    tokens = _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) ^ 0x85EBCA6B)  # (V,)
    bits = _mix32(rows[:, None] ^ tokens[None, :])  # (B, V)
    bits = _mix32(bits ^ _mix32(rows ^ 0xC2B2AE35)[:, None])  # (B, V)
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23  # (B, V) in (0, 1), exact in fp32
    return -torch.log(-torch.log(uniform))  # (B, V)


def sample_from_logits(
    logits: Tensor,
    noise: Tensor | None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw one token per row: ``argmax(filter(logits / temperature) + noise)``; plain argmax when
    ``temperature == 0`` (greedy).

    Args:
        logits: ``(B, V)`` (not modified).
        noise: ``(B, V)`` standard Gumbel noise (see :func:`gumbel_noise`); ignored (may be ``None``) when greedy.
        temperature, top_k, top_p: See :func:`generate`.

    Returns:
        ``(B,)`` int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None:
        raise ValueError("sampling with temperature > 0 needs noise (see gumbel_noise)")
    scaled = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)  # (B, V)
    return (scaled + noise).argmax(dim=-1)  # (B,)


# ---------------------------------------------------------------------------------------------------------------------
# the loop
def _check_options(
    cfg_scale: float,
    cfg_schedule: str,
    cfg_interval: tuple[float, float],
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    sample_offset: int,
) -> None:
    def number(value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    if not number(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if (
        not isinstance(cfg_interval, (tuple, list))
        or len(cfg_interval) != 2
        or not all(number(v) for v in cfg_interval)
        or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0
    ):
        raise ValueError(f"cfg_interval must be (start, end) with 0 <= start <= end <= 1, got {cfg_interval!r}")
    if not number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")


@torch.no_grad()
def generate(
    model: GPT,
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
    use_cache: bool = True,
) -> Tensor:
    """Sample one token grid per class label.

    Args:
        model: The generator; run in eval mode for the call (its mode is restored afterwards). With ``use_cache`` a
            KV cache for ``B`` (``2B`` with guidance) sequences is allocated unless one that fits is present; it stays
            on the model for the next call (``model.clear_cache()`` frees it).
        classes: ``(B,)`` class ids in ``[0, num_classes)``.
        cfg_scale: Classifier-free guidance scale ``s`` in ``u + s (c - u)``; 1 disables guidance (no doubled batch),
            0 samples from the null class alone. Guidance needs a model trained with class dropout.
        cfg_schedule: ``"constant"``, ``"linear"`` or ``"interval"`` (see :func:`guidance_scale`).
        cfg_interval: ``(start, end)`` fractions of the sequence guided by the ``"interval"`` schedule.
        temperature: Softmax temperature; 0 takes the most likely token (greedy, no randomness).
        top_k: Keep the k most likely tokens (0 = all).
        top_p: Nucleus sampling threshold (1 = off).
        seed: Seed of the run; a sample's tokens depend only on ``seed`` and its index ``sample_offset + i``.
        sample_offset: Global index of the first sample, so that a run split across processes or batches draws the
            same tokens as one big batch.
        use_cache: Use the static KV cache (one token per step); ``False`` recomputes the whole prefix each step
            (``O(T^2)``, for benchmarks and checks).

    Returns:
        ``(B, T)`` int64 tokens in raster order; :func:`~fvq.generation.layout.tokens_to_grid` gives the tokenizer's
        ``(B, h, w)`` index grid.
    """
    _check_options(cfg_scale, cfg_schedule, cfg_interval, temperature, top_k, top_p, seed, sample_offset)
    if not isinstance(model, GPT):
        raise TypeError(f"model must be an fvq GPT, got {type(model).__name__}")
    device = model.device
    classes = torch.as_tensor(classes, device=device)
    model._check_classes(classes)
    if classes.shape[0] == 0:
        raise ValueError("classes is empty: pass at least one class id")
    model._check_ranges(classes, None)
    batch, length, vocab = classes.shape[0], model.seq_len, model.config.vocab_size
    scales = [
        guidance_scale(t, length, scale=cfg_scale, schedule=cfg_schedule, interval=tuple(cfg_interval))
        for t in range(length)
    ]
    guided = any(s != 1.0 for s in scales)
    if guided and not model.config.has_null_class:
        raise ValueError(
            f"classifier-free guidance (cfg_scale={cfg_scale}) needs the null class, but this model was trained "
            f"with class_dropout_prob = 0 and has none; sample with cfg_scale=1"
        )
    if guided:  # conditional rows first, then the same labels as the null class
        run_classes = torch.cat([classes, classes])  # (2B,)
        drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(device)
    else:
        run_classes, drop = classes, None
    sample_indices = torch.arange(sample_offset, sample_offset + batch, device=device, dtype=torch.int64)  # (B,)
    tokens = torch.empty(batch, length, dtype=torch.int64, device=device)  # (B, T)

    was_training = model.training
    model.eval()
    try:
        if use_cache:
            model.ensure_cache(run_classes.shape[0])
        for t in range(length):
            if use_cache and t == 0:
                logits = model._prefill(run_classes, drop)  # (B', V)
            elif use_cache:
                previous = tokens[:, t - 1]  # (B,)
                fed = torch.cat([previous, previous]) if guided else previous  # (B',)
                logits = model._decode(fed, t)  # (B', V) logits of token t
            else:
                prefix = tokens[:, :t]  # (B, t)
                prefix = torch.cat([prefix, prefix]) if guided else prefix  # (B', t)
                logits = model._prefix_logits(run_classes, drop, prefix)[:, -1]  # (B', V)
            if guided:
                cond, uncond = logits[:batch], logits[batch:]  # (B, V) each
                logits = apply_guidance(cond, uncond, scales[t])  # (B, V)
            noise = None if temperature == 0 else gumbel_noise(seed, sample_indices, t, vocab)  # (B, V)
            tokens[:, t] = sample_from_logits(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
    finally:
        model.train(was_training)
    return tokens
