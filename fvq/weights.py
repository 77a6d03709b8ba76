"""Finding, verifying and caching pretrained weight files (LPIPS backbones, the FID Inception).

Nothing here downloads unless asked: weights come from files that installed packages ship, from a path the user
gives, or (for users with internet) from a URL fetched once with a pinned checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


class WeightsNotFoundError(FileNotFoundError):
    """No usable weight file was found; the message says where fvq looked and how to provide one."""


def cache_dir() -> Path:
    """fvq's cache folder: ``$FVQ_CACHE``, else ``$XDG_CACHE_HOME/fvq``, else ``~/.cache/fvq`` (created)."""
    root = os.environ.get("FVQ_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fvq"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str = "weight file") -> None:
    """Raise ``ValueError`` unless the file's SHA-256 equals ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(
            f"{what} {path} has SHA-256 {actual}, expected {expected}: the file is corrupt or not the one fvq "
            f"supports; delete it or pass the right file"
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for a writer that needs a file name (a compiler's ``-o``, ``torch.save``).

    The temporary file is renamed to ``path`` when the block exits normally (with the mode a plain ``open()`` would
    give it) and removed when it raises, so ``path`` is never seen half-written. The project's one atomic write:
    :func:`atomic_write_bytes` is it for bytes already in memory.

    Example::

        with atomic_path(target) as tmp:
            subprocess.run(["cc", "-o", str(tmp), "kernel.c"], check=True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def download_file(url: str, dest: str | os.PathLike, sha256: str, what: str = "weight file") -> Path:
    """Download ``url`` to ``dest`` (atomically), verify its SHA-256, return ``dest``. Reuses a verified ``dest``."""
    dest = Path(dest)
    if dest.exists():
        verify_sha256(dest, sha256, what)
        return dest
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the user asked for this download
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise ValueError(f"{what} downloaded from {url} has SHA-256 {digest}, expected {sha256}; not saved")
    atomic_write_bytes(dest, data)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints of other projects (LlamaGen, the FVQ release)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_foreign_checkpoint(path: str | os.PathLike) -> dict:
    """Read another project's ``.pt`` checkpoint with ``torch.load(weights_only=True)``: no code is unpickled.

    Tensors, containers and ``argparse.Namespace`` (LlamaGen's training arguments) are allowed.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file holds other objects, or is not a dict; the message says how to re-save it.
    """
    import argparse

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:  # torch < 2.5: Namespace-holding checkpoints cannot be read safely
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors name the offending class; keep that detail
        raise ValueError(
            f"could not read {path} with torch.load(weights_only=True): {error}. fvq reads tensors, containers and "
            f"argparse.Namespace only; re-save the state dict alone (torch.save(ckpt['model'], ...)) if the file "
            f"holds other objects"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}; expected a dict (a checkpoint or state dict)")
    return checkpoint


def strip_wrapper_prefixes(state: dict) -> dict:
    """The state dict with the ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes removed."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def select_state_dict(
    checkpoint: dict,
    path: str | os.PathLike,
    *,
    key: str | None,
    entries: tuple[str, ...],
    is_bare: Callable[[dict], bool],
) -> tuple[dict, str | None]:
    """The state dict inside another project's checkpoint, wrapper prefixes removed.

    Args:
        checkpoint: What :func:`read_foreign_checkpoint` returned.
        path: The file (for messages).
        key: The entry to read; ``None`` picks the file itself when ``is_bare(checkpoint)``, else the first of
            ``entries`` present.
        entries: Entries that may hold the state dict, in order of preference (e.g. ``("ema", "model")``).
        is_bare: Whether the checkpoint is itself a state dict.

    Returns:
        ``(state_dict, entry)``; ``entry`` is ``None`` for a bare state dict.
    """
    import torch

    if key is not None:
        if key not in checkpoint:
            raise ValueError(f"{path} has no entry {key!r}; it has {sorted(map(str, checkpoint))}")
    elif is_bare(checkpoint):
        key = None
    else:
        key = next((k for k in entries if k in checkpoint), None)
        if key is None:
            raise ValueError(
                f"{path} holds neither a state dict nor any of the entries {list(entries)}; "
                f"it has {sorted(map(str, checkpoint))}"
            )
    state = checkpoint if key is None else checkpoint[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        where = "the file" if key is None else f"entry {key!r}"
        raise ValueError(f"{where} of {path} is not a state dict of tensors")
    return strip_wrapper_prefixes(state), key
