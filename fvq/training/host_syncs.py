"""Count the device-to-host synchronisations a piece of code asks for.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``,
``.cpu()``, ``.numpy()``) waits for every queued kernel: in a training step each one stalls the GPU. On CPU they are
free, but they can be counted all the same, which is how fvq keeps them out of the training step. Reads that torch's
C++ code makes itself when it turns a tensor into a number (a tensor passed where an operator takes a scalar) are
counted too, as ``_local_scalar_dense`` (the operator behind ``.item()``). The count is still a lower bound: an output
whose shape depends on the values (``nonzero``, boolean-mask indexing) also waits for the device, and is not seen.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Within the block, count host reads of tensor values by kind.

    Yields:
        A :class:`collections.Counter` filled while the block runs: ``{"item": 3, "__bool__": 1, ...}``. Reads of
        tensors that are already on the CPU are counted too (they would be synchronisations on an accelerator).
    """
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            if not depth[0]:  # count the outermost read only (float() may call item() inside)
                counts[name] += 1
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return read

    depth = [0]

    class _ScalarReads(TorchDispatchMode):
        """Counts ``_local_scalar_dense`` calls that no Python-level read above asked for."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and not depth[0]:
                counts["_local_scalar_dense"] += 1
            return func(*args, **(kwargs or {}))

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        with _ScalarReads():
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
