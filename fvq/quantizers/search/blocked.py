"""The blocked sgemm search: exact nearest codes from cache-sized blocks of fp32 distances.

:func:`fvq.quantizers.search.nearest_codes` runs it where :mod:`fvq.quantizers.search.dispatch` measures it fastest
(e.g. AVX-512 Xeons), on GPUs without bf16 units, for non-finite inputs and with ``FVQ_SEARCH_KERNEL=blocked``.
Distances are computed
``(rows, codes)`` at a time on augmented operands, ``[-2 z_i, 1] . [c_k, ||c_k||^2]`` (the bias rides in the matmul
instead of costing a pass over the block, and the ``-2`` is an exact scaling), by one sgemm per panel of codes sized
to the L2 cache, each panel's group minima taken right after its sgemm, and each block is then reduced while it is
still in cache (:func:`_fold_block_min`). The loops sweep the codebook once per ``_SWEEP_ROWS`` queries: each block of
codes is copied into its augmented form once and met by every block of rows of the sweep, whose running minima it
updates in index order. Ties go to the lowest index, identical codes included (:func:`_lowest_duplicates`).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch
from torch import Tensor

# Shape of one distance block on CPU: 1024 queries x 2048 codes (8 MiB), reduced at once while it is in the shared
# cache. Its matmul is issued in panels of codes whose packed fp32 operand fills about one core's L2 (a panel of
# ``L2 bytes / 1 KiB`` codes, i.e. 257 floats a code at D = 256): 2048 codes (one panel) on a 2 MiB-L2 Xeon, 512 codes
# (four panels) on a 512 KiB-L2 EPYC, where one 2048-code matmul runs about 15 % slower (docs/benchmarks.md).
# ``max_chunk_bytes`` stays a hard upper bound on the block.
_CPU_BLOCK_ROWS = 1024
_CPU_BLOCK_CODES = 2048
# Codes per group of the cheap first pass over a block (a multiple of the 16 fp32 lanes of AVX-512).
_ARGMIN_GROUP = 64
# Queries per sweep over the codebook: each block of codes is copied into its augmented form once per sweep.
_SWEEP_ROWS = 16384
# Codes per chunk when computing ||c||^2 or hashing codes (bounds the (chunk, D) temporaries).
_NORM_CHUNK = 1024
# L2 size assumed where the system does not tell it (the Xeon the block shape was first tuned on).
_DEFAULT_L2_BYTES = 2 * 2**20


def _l2_bytes() -> int:
    """Size of one core's L2 cache in bytes, from Linux sysfs; ``_DEFAULT_L2_BYTES`` where it cannot be read."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if level == "2" and kind in ("Unified", "Data"):
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return _DEFAULT_L2_BYTES


def _panel_codes(l2_bytes: int) -> int:
    """Codes per matmul panel on CPU for an L2 of ``l2_bytes``: ``l2_bytes / 1 KiB`` in whole argmin groups, at least
    four groups and at most one block."""
    codes = (l2_bytes // 1024) // _ARGMIN_GROUP * _ARGMIN_GROUP
    return min(_CPU_BLOCK_CODES, max(4 * _ARGMIN_GROUP, codes))


_CPU_PANEL_CODES = _panel_codes(_l2_bytes())


def _search_block_shape(n: int, k: int, max_chunk_bytes: int, device: torch.device) -> tuple[int, int, int]:
    """``(rows, codes, panel)`` of one distance block: cache-sized on CPU, as large as allowed elsewhere, within the
    bound; its matmul is issued ``panel`` codes at a time (one panel off the CPU).

    Blocks of codes are whole argmin groups and whole panels where they can be, so that only the end of the codebook
    leaves narrower panels and a tail of fewer than ``_ARGMIN_GROUP`` codes (see :func:`_code_blocks`).
    """
    max_elems = max_chunk_bytes // 4
    if device.type == "cpu":
        codes = min(k, _CPU_BLOCK_CODES, max_elems)
        rows = min(n, max(1, _CPU_BLOCK_ROWS * _CPU_BLOCK_CODES // codes), max_elems // codes)  # small K: more rows
    else:
        codes = min(k, max_elems)
        rows = min(n, max_elems // codes)
    if _ARGMIN_GROUP < codes < k:
        codes -= codes % _ARGMIN_GROUP
    panel = min(codes, _CPU_PANEL_CODES) if device.type == "cpu" else codes
    if panel < codes < k:
        codes -= codes % panel
    return max(1, rows), codes, panel


def _squared_norms(codebook: Tensor) -> Tensor:
    """``||c_k||^2`` in fp32 as a sum of squares, ``(K,)``, without a ``(K, D)`` temporary."""
    k = codebook.shape[0]
    out = torch.empty(k, dtype=torch.float32, device=codebook.device)
    for j in range(0, k, _NORM_CHUNK):
        torch.sum(codebook[j : j + _NORM_CHUNK].float().square(), dim=1, out=out[j : j + _NORM_CHUNK])
    return out


def _code_bits(codes: Tensor) -> Tensor:
    """fp32 codes as their int32 bit patterns, with -0.0 turned into +0.0 first (equal values, equal bits)."""
    return (codes.float() + 0.0).view(torch.int32)


def _bit_hash(codebook: Tensor, rows: Tensor) -> Tensor:
    """``(M,)`` int64 hash of the codes ``codebook[rows]``, from their bits, ``_NORM_CHUNK`` rows at a time.

    A weighted sum in wrap-around integer arithmetic does not depend on the summation order (a float dot product
    does), so equal codes always hash equal.
    """
    gen = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(1, 2**20, (codebook.shape[1],), generator=gen, dtype=torch.int64).to(codebook.device)
    out = torch.empty(rows.numel(), dtype=torch.int64, device=codebook.device)
    for j in range(0, rows.numel(), _NORM_CHUNK):
        bits = _code_bits(codebook[rows[j : j + _NORM_CHUNK]])  # (m, D)
        torch.sum(bits.long() * weights, dim=1, out=out[j : j + _NORM_CHUNK])
    return out


def _lowest_duplicates(codebook: Tensor, code_sq: Tensor) -> Tensor | None:
    """For each code, the lowest index holding the same vector, ``(K,)`` int64; ``None`` if all codes differ.

    The search's matmul may round the distances to two identical codes differently (BLAS kernels differ by tile
    position and block width), so "ties go to the lowest index" cannot be left to the distances alone for duplicate
    codes; mapping every found index through this table makes it exact. Cost: one sort of the bits of ``||c||^2``
    (identical codes have bit-identical norms, as one row reduction computes them all); only if two norms share their
    bits, a sort of the norms with their indices, then hashing and comparing the codes whose norm is shared with
    another code, ``_NORM_CHUNK`` rows at a time.
    """
    k = codebook.shape[0]
    if k < 2:
        return None
    if codebook.device.type != "cpu":
        return _lowest_duplicates_without_host_reads(codebook, code_sq)
    # The usual case first: no two norms share their bits. Sorting the bits as int32 values, without indices, takes
    # torch's radix sort: 2 ms at K = 262,144 on 2 cores, against 18 ms for a float sort with indices.
    sorted_bits = torch.sort(code_sq.view(torch.int32)).values  # (K,)
    if not bool((sorted_bits[1:] == sorted_bits[:-1]).any()):
        return None
    sorted_sq, order = torch.sort(code_sq, stable=True)  # (K,), (K,)
    shared = sorted_sq[1:] == sorted_sq[:-1]  # (K - 1,)
    if not bool(shared.any()):
        return None
    in_group = torch.zeros(k, dtype=torch.bool, device=codebook.device)
    in_group[1:] |= shared
    in_group[:-1] |= shared
    cand = order[in_group].sort().values  # (M,) codes sharing their norm with another code, ascending
    cand_sq, cand_hash = code_sq[cand], _bit_hash(codebook, cand)  # (M,), (M,)
    # sort by (norm, hash); the stable sorts keep ascending code order inside each group
    key = torch.sort(cand_hash, stable=True).indices  # (M,)
    key = key[torch.sort(cand_sq[key], stable=True).indices]  # (M,)
    codes_sorted = cand[key]  # (M,)
    sq_sorted, hash_sorted = cand_sq[key], cand_hash[key]
    starts = torch.ones(cand.numel(), dtype=torch.bool, device=codebook.device)
    starts[1:] = (sq_sorted[1:] != sq_sorted[:-1]) | (hash_sorted[1:] != hash_sorted[:-1])
    group = torch.cumsum(starts.long(), dim=0) - 1  # (M,) group of each sorted candidate
    first = codes_sorted[starts.nonzero().squeeze(1)][group]  # (M,) lowest code of the group
    same = torch.empty(cand.numel(), dtype=torch.bool, device=codebook.device)
    for j in range(0, cand.numel(), _NORM_CHUNK):
        a = _code_bits(codebook[codes_sorted[j : j + _NORM_CHUNK]])  # (m, D)
        b = _code_bits(codebook[first[j : j + _NORM_CHUNK]])  # (m, D)
        torch.all(a == b, dim=1, out=same[j : j + _NORM_CHUNK])
    lowest = torch.arange(k, device=codebook.device)
    lowest[codes_sorted[same]] = first[same]
    for g in group[~same].unique().tolist():  # a hash collision between different codes: vanishingly rare
        members = codes_sorted[group == g].sort().values  # (m,)
        _, inverse = torch.unique(_code_bits(codebook[members]), dim=0, return_inverse=True)  # (m,)
        firsts = torch.full((int(inverse.max()) + 1,), k, dtype=torch.long, device=codebook.device)
        firsts.scatter_reduce_(0, inverse, members, reduce="amin")
        lowest[members] = firsts[inverse]
    return lowest


_DEVICE_DUPLICATE_ROUNDS = 2


def _lowest_duplicates_without_host_reads(codebook: Tensor, code_sq: Tensor) -> Tensor:
    """:func:`_lowest_duplicates` for accelerators: the ``(K,)`` table always, computed without reading a value on
    the host, so a training step on a GPU does not wait here (the CPU form's early exits read flags).

    Codes are sorted by (bits of ``||c||^2``, bit hash), ascending index among equal keys; each code is then compared
    bit for bit with the lowest code of its key, in :data:`_DEVICE_DUPLICATE_ROUNDS` rounds: a round settles every
    code still open that equals the lowest open code of its key. Exact unless more than that many different codes
    share both their norm's bits and their hash (a code left open maps to itself).
    """
    k, device = codebook.shape[0], codebook.device
    positions = torch.arange(k, device=device)
    code_hash = _bit_hash(codebook, positions)  # (K,)
    norm_bits = code_sq.view(torch.int32).long()  # (K,)
    order = torch.sort(code_hash, stable=True).indices  # (K,)
    order = order[torch.sort(norm_bits[order], stable=True).indices]  # by (norm bits, hash), ascending code within
    key_start = torch.ones(k, dtype=torch.bool, device=device)
    key_start[1:] = (norm_bits[order[1:]] != norm_bits[order[:-1]]) | (code_hash[order[1:]] != code_hash[order[:-1]])
    key = torch.cumsum(key_start.long(), dim=0) - 1  # (K,) key of each sorted code
    lowest = order.clone()  # (K,) lowest duplicate of each sorted code
    open_ = torch.ones(k, dtype=torch.bool, device=device)
    for _ in range(_DEVICE_DUPLICATE_ROUNDS):
        # the open codes of each key first, in code order: the lowest open code starts its segment
        perm = torch.sort(key * 2 + (~open_).long(), stable=True).indices  # (K,)
        seg_key, seg_open = key[perm], open_[perm]
        seg_start = torch.ones(k, dtype=torch.bool, device=device)
        seg_start[1:] = (seg_key[1:] != seg_key[:-1]) | (seg_open[1:] != seg_open[:-1])
        first = torch.cummax(torch.where(seg_start, positions, 0), dim=0).values  # (K,) segment start
        codes, firsts = order[perm], order[perm[first]]  # (K,), (K,)
        same = torch.empty(k, dtype=torch.bool, device=device)
        for j in range(0, k, _NORM_CHUNK):
            a = _code_bits(codebook[codes[j : j + _NORM_CHUNK]])  # (m, D)
            b = _code_bits(codebook[firsts[j : j + _NORM_CHUNK]])  # (m, D)
            torch.all(a == b, dim=1, out=same[j : j + _NORM_CHUNK])
        same &= seg_open
        lowest[perm] = torch.where(same, firsts, lowest[perm])
        open_[perm] = seg_open & ~same
    table = torch.empty(k, dtype=torch.long, device=device)
    table[order] = lowest
    return table


def _first_min(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row minimum of a 2-d ``x`` and its first column: ``(n,)`` values and ``(n,)`` int64 indices."""
    return x.min(dim=1)  # torch documents the first minimal index on ties


class _BlockViews:
    """Views of the scratch buffers for one ``(n, k)`` block of ``p`` panels of ``w = k / p`` codes, made once per
    shape and call. Panel ``q`` holds the distances to codes ``q * w`` to ``(q + 1) * w - 1`` of the block as a
    contiguous ``(n, w)`` matrix (``panels[q]``); all panels together, as ``(p, n, G, g)`` and ``(p * n * G, g)``, are
    the argmin groups of ``g`` codes, and their minima are ``(p, n, G)`` (``G = 0`` for a tail)."""

    __slots__ = ("panels", "panel_groups", "panel_minima", "group_rows", "minima", "num_groups", "rows")

    def __init__(self, block_buf: Tensor, group_buf: Tensor, n: int, k: int, w: int) -> None:
        g, p = _ARGMIN_GROUP, k // w
        self.rows = n
        self.panels = [block_buf[q * n * w : (q + 1) * n * w].view(n, w) for q in range(p)]
        self.num_groups = w // g if w % g == 0 else 0
        if self.num_groups:
            groups = block_buf[: n * k].view(p, n, self.num_groups, g)
            self.panel_groups = list(groups.unbind(0))  # (n, G, g) each
            self.group_rows = block_buf[: n * k].view(p * n * self.num_groups, g)
            self.minima = group_buf[: p * n * self.num_groups].view(p, n, self.num_groups)
            self.panel_minima = list(self.minima.unbind(0))  # (n, G) each


def _fold_block_min(block: _BlockViews, start: int, best_val: Tensor, best_idx: Tensor) -> None:
    """Fold the row minima of one ``(n, k)`` block of distances, to codes ``start`` onwards, into the running minima
    of its rows, in place, as ``torch.min`` over all blocks seen so far would give them.

    A block replaces a row's minimum only where its own minimum is strictly smaller (ties keep the lower index of an
    earlier block), or is NaN where the running minimum is not (``torch.min`` returns the first NaN). The row minimum
    comes from cheap passes: when the panel width is a multiple of ``_ARGMIN_GROUP``, ``amin`` over contiguous groups
    of ``_ARGMIN_GROUP`` columns (one pass over the block while it is in cache), then ``amin`` over the group minima
    of all panels. The indexed minimum, several times slower per element on CPU, then runs over the group minima in
    code order (the first group holding the row minimum also holds its lowest column) and inside that one group,
    whose columns are fetched as one contiguous row each. On CPU it runs only for the rows this block improves, which
    after the first blocks are a minority; elsewhere for all rows, as selecting them would wait for the device. A tail
    of fewer than ``_ARGMIN_GROUP`` codes (one panel) is reduced directly.

    Args:
        block: Views of the ``(n, k)`` fp32 distances and their group minima.
        start: Index of the block's first code.
        best_val: ``(n,)`` running minima, updated in place (``+inf`` before the first block).
        best_idx: ``(n,)`` int64 code of each running minimum, updated in place.
    """
    n, g, groups = block.rows, _ARGMIN_GROUP, block.num_groups
    panels = len(block.panels)
    if groups:
        minima = block.minima  # (p, n, G), computed panel by panel: see nearest_codes_blocked
        row_min = block.panel_minima[0].amin(dim=1) if panels == 1 else minima.amin(dim=(0, 2))  # (n,)
    else:
        row_min, column = _first_min(block.panels[0])  # (n,), (n,)
    better = (row_min < best_val) | (row_min.isnan() & ~best_val.isnan())  # (n,)
    if row_min.device.type == "cpu":
        rows = better.nonzero().view(-1)  # (r,)
    else:
        rows = torch.arange(n, device=row_min.device)  # (n,)
    if rows.numel() == 0:
        return
    if groups:
        if panels == 1:
            _, first_group = _first_min(block.panel_minima[0].index_select(0, rows))  # (r,)
            flat = torch.add(first_group, rows, alpha=groups)  # (r,) row of the group in ``group_rows``
        else:
            picked = minima.index_select(1, rows).transpose(0, 1).reshape(rows.numel(), panels * groups)  # (r, p G)
            _, first_group = _first_min(picked)  # (r,) group in code order: panel * G + group in panel
            panel = torch.div(first_group, groups, rounding_mode="floor")  # (r,)
            flat = torch.add(first_group, rows, alpha=groups).add_(panel, alpha=groups * (n - 1))  # (r,)
        value, offset = _first_min(block.group_rows.index_select(0, flat))  # (r,), (r,) from (r, g) members
        index = offset.add_(first_group, alpha=g).add_(start)  # (r,)
    else:
        value, index = row_min[rows], column[rows].add_(start)  # (r,), (r,)
    if rows.numel() == n:  # every row: keep the running minimum where this block is not better
        torch.where(better, value, best_val, out=best_val)
        torch.where(better, index, best_idx, out=best_idx)
    else:
        best_val.index_copy_(0, rows, value)
        best_idx.index_copy_(0, rows, index)


class _Scratch(threading.local):
    """The search buffers of the latest CPU call on this thread, and the shape they were made for."""

    key: tuple | None = None
    buffers: tuple[Tensor, ...] = ()


_SCRATCH = _Scratch()


def _search_buffers(sweep: int, codes: int, rows: int, d: int, device: torch.device) -> tuple[Tensor, ...]:
    """fp32 scratch of one search: ``(sweep, D + 1)`` and ``(codes, D + 1)`` augmented operands, a ``(rows * codes,)``
    distance block and ``rows * codes / _ARGMIN_GROUP`` group minima.

    On CPU the buffers of the latest call on each thread are kept for the next call of the same shape (a training
    loop makes one per step): a fresh multi-MiB allocation comes back from the kernel unpopulated, and faulting its
    pages in costs about 3 ms a call at K = 16,384, N = 8,192 (1-2 % of the search). A call of another shape replaces
    them, so what is kept never exceeds one call's scratch. On other devices the caching allocator reuses memory.
    """
    key = (sweep, codes, rows, d, device)
    if device.type == "cpu":
        if _SCRATCH.key == key:
            return _SCRATCH.buffers
        _SCRATCH.key, _SCRATCH.buffers = None, ()  # release the previous shape's buffers before allocating
    f32 = {"dtype": torch.float32, "device": device}
    with torch.inference_mode(False):  # normal tensors: writable by later calls in and out of inference mode
        buffers = (
            torch.empty(sweep, d + 1, **f32),
            torch.empty(codes, d + 1, **f32),
            torch.empty(rows * codes, **f32),
            torch.empty(rows * max(1, codes // _ARGMIN_GROUP), **f32),
        )
    if device.type == "cpu":
        _SCRATCH.key, _SCRATCH.buffers = key, buffers
    return buffers


def _code_blocks(k: int, codes: int, panel: int) -> list[tuple[int, int, int]]:
    """``(start, width, panel width)`` of each block of codes, in index order: blocks of up to ``codes`` codes, each
    split into its whole panels, a narrower panel of the whole argmin groups left (reduced in two levels) and, where
    ``codes`` or ``K`` is not a multiple of ``_ARGMIN_GROUP``, a tail of fewer than ``_ARGMIN_GROUP`` codes (reduced
    directly). Every block is a whole number of panels of its panel width."""
    blocks = []
    for start in range(0, k, codes):
        width = min(codes, k - start)
        whole = width - width % _ARGMIN_GROUP
        full = whole - whole % panel
        if full:
            blocks.append((start, full, panel))
        if full < whole:
            blocks.append((start + full, whole - full, whole - full))
        if whole < width:
            blocks.append((start + whole, width - whole, width - whole))
    return blocks


def nearest_codes_blocked(z: Tensor, codebook: Tensor, code_sq: Tensor, max_chunk_bytes: int, out: Tensor) -> Tensor:
    """Nearest code of each row of ``z`` by the blocked search: the ``argmin`` of the full ``N x K`` matrix of fp32
    distances with ties going to the lowest index, identical codes included, and no distance block larger than
    ``max_chunk_bytes``.

    Called by :func:`fvq.quantizers.search.nearest_codes`, which checks the inputs and runs this without autograd
    and autocast; bf16 / fp16 inputs are cast up block by block.

    Args:
        z: ``(N, D)`` query vectors, ``N >= 1``, any float dtype.
        codebook: ``(K, D)`` code vectors on the same device.
        code_sq: ``(K,)`` fp32 ``||c_k||^2`` (:func:`_squared_norms`).
        max_chunk_bytes: Upper bound in bytes on one fp32 distance block (at least 4).
        out: ``(N,)`` int64 tensor on the same device, overwritten with the indices.

    Returns:
        ``(N,)`` int64 indices into ``codebook``: ``out`` itself, or a new tensor where duplicate codes were remapped.
    """
    (n, d), k = z.shape, codebook.shape[0]
    device = z.device
    rows, codes, panel = _search_block_shape(n, k, max_chunk_bytes, device)
    sweep = min(n, max(rows, _SWEEP_ROWS))
    # [-2 z_i, 1], [c_k, ||c_k||^2], one (rows, codes) distance block, its group minima
    z_aug, code_aug, block_buf, group_buf = _search_buffers(sweep, codes, rows, d, device)
    z_aug[:, d] = 1.0
    best_val = torch.full((n,), math.inf, dtype=torch.float32, device=device)  # running row minima; ``out``: codes
    out.zero_()
    views: dict[tuple[int, int, int], _BlockViews] = {}
    blocks = _code_blocks(k, codes, panel)
    for s in range(0, n, sweep):
        m = min(sweep, n - s)
        z_aug[:m, :d].copy_(z[s : s + m]).mul_(-2.0)  # (m, D), cast to fp32 before the exact scaling
        row_blocks = []  # (augmented queries, running minima, their codes) of each block of queries
        for i in range(s, s + m, rows):
            r = min(rows, s + m - i)
            row_blocks.append((z_aug[i - s : i - s + r], best_val[i : i + r], out[i : i + r]))
        for start, width, panel_width in blocks:
            code_aug[:width, :d].copy_(codebook[start : start + width])  # (w, D)
            code_aug[:width, d].copy_(code_sq[start : start + width])  # (w,)
            panels_t = [code_aug[q : q + panel_width].t() for q in range(0, width, panel_width)]  # (D + 1, pw)
            for z_rows, best_rows, index_rows in row_blocks:
                key = (z_rows.shape[0], width, panel_width)
                block = views.get(key)
                if block is None:
                    block = views[key] = _BlockViews(block_buf, group_buf, *key)
                for q, (codes_t, dist) in enumerate(zip(panels_t, block.panels)):
                    torch.mm(z_rows, codes_t, out=dist)  # (r, pw): ||c||^2 - 2 z.c
                    if block.num_groups:  # group minima while the panel is in cache
                        torch.amin(block.panel_groups[q], dim=2, out=block.panel_minima[q])
                _fold_block_min(block, start, best_rows, index_rows)
    lowest = _lowest_duplicates(codebook, code_sq)  # (K,) or None
    return out if lowest is None else lowest[out]
