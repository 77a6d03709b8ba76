"""The FID Inception with its 1,008-class classifier, read from pytorch-fid's weight file, for the Inception Score.

The Inception Score needs the logits of the ``inception-2015-12-05`` graph's classifier (``softmax/logits``, 1,008
classes), which the offline FID Inception (``default_1.pt``, see :mod:`fvq.evaluation.inception`) does not contain.
pytorch-fid publishes the same graph ported to PyTorch, classifier included, as a state dict::

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    (95,628,359 bytes, SHA-256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2)

torch-fidelity ships the same bytes as ``weights-inception-2015-12-05-6726825d.pth``. fvq never downloads it: give
the file with ``path=`` (``fvq eval-gen --inception-is PATH``) or ``$FVQ_IS_INCEPTION_WEIGHTS``, or let fvq find it
in torch.hub's checkpoint folder, where pytorch-fid and torch-fidelity put it. The file is checked against the
SHA-256 above (pass ``sha256=`` to use another file deliberately) and read with ``torch.load(weights_only=True)``.

:class:`ClassifierInception` is the module layout that file's keys name: torchvision's ``Inception3`` without the
auxiliary classifier (``Conv2d_1a_3x3`` ... ``Mixed_7c``, ``fc``), with pytorch-fid's changes that make it the TF
graph (its ``FIDInceptionA/C/E`` blocks):

* the average pools inside the Inception blocks ignore the zero padding (``count_include_pad=False``), as
  TensorFlow's do;
* the last block (``Mixed_7c``) pools its fourth branch with a 3x3 max pool instead of an average pool, as the graph
  does;
* batch norms use eps = 0.001 and their stored statistics.

Logits follow the ADM evaluator: ``pool_3 @ W`` with ``W`` the graph's ``softmax/weights`` and without its
``softmax/biases`` (ADM takes the weight input of the ``softmax/logits/MatMul`` op; torch-fidelity's
``logits_unbiased`` is the same). The state dict stores ``W`` transposed as ``fc.weight``, so
:attr:`ClassifierOutput.logits` is ``pool @ fc.weight.T``. When the file's convolutional trunk is the FID
Inception's (checked weight by weight with :func:`shares_trunk`), these logits are computed from the FID Inception's
own pool features, with no second network pass; otherwise the classifier runs its own pass (its batch norms then
apply the file's ``bn.weight``, as pytorch-fid's network does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.weights import WeightsNotFoundError, sha256_file

PT_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PT_INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PT_INCEPTION_FILENAME}"
# torch-fidelity's name for the same file
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
IS_INCEPTION_ENV = "FVQ_IS_INCEPTION_WEIGHTS"
NUM_CLASSES = 1008
POOL_DIM = 2048


# ----------------------------------------------------------------------------------------------------------------
# the network


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: the ``conv`` + ``bn`` pair of the state dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, averages only the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b/c/d``): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """17x17 block (``Mixed_6b..e``) with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """8x8 block (``Mixed_7b``, ``Mixed_7c``) with split 1x3 / 3x1 convolutions.

    Args:
        in_channels: Input channels.
        pool: ``"avg"`` (``Mixed_7b``) or ``"max"`` (``Mixed_7c``: the graph max-pools here).
    """

    def __init__(self, in_channels: int, pool: str = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], 1)


@dataclass
class ClassifierOutput:
    """Output of :class:`ClassifierInception`.

    Attributes:
        pool: ``(B, 2048)`` float32 ``pool_3`` features.
        logits: ``(B, 1008)`` float32 classifier logits without the bias (``pool @ fc.weight.T``, as ADM).
    """

    pool: Tensor
    logits: Tensor


class ClassifierInception(nn.Module):
    """The ``inception-2015-12-05`` Inception-v3 with its 1,008-class classifier, in pytorch-fid's state-dict layout.

    Takes the same input as the FID Inception's network: ``(B, 3, 299, 299)`` float in [-1, 1)
    (:meth:`fvq.evaluation.inception.FIDInception.preprocess`). Always in eval mode.

    Attributes:
        sha256: SHA-256 of the weight file it was loaded from (``""`` when built directly).
        path: That file (``None`` when built directly).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.sha256 = ""
        self.path: Path | None = None
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ClassifierInception:
        """The network always stays in eval mode (its batch norms use their stored statistics)."""
        return super().train(False)

    def convolutions(self) -> list[BasicConv2d]:
        """The 94 conv + batch-norm units in the order the network runs them."""
        return [m for m in self.modules() if isinstance(m, BasicConv2d)]

    def logits_from_pool(self, pool: Tensor) -> Tensor:
        """``(B, 2048)`` pool features -> ``(B, 1008)`` float32 logits ``pool @ fc.weight.T`` (no bias, as ADM)."""
        if pool.ndim != 2 or pool.shape[1] != POOL_DIM:
            raise ValueError(f"pool features must have shape (B, {POOL_DIM}), got {tuple(pool.shape)}")
        weight = self.fc.weight  # (1008, 2048)
        return pool.to(device=weight.device, dtype=torch.float32) @ weight.T.float()

    @torch.inference_mode()
    def forward(self, x: Tensor) -> ClassifierOutput:
        """Pool features and logits of a preprocessed batch.

        Args:
            x: ``(B, 3, 299, 299)`` float network input in [-1, 1).

        Returns:
            :class:`ClassifierOutput` with ``(B, 2048)`` pool features and ``(B, 1008)`` logits.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the network input must have shape (B, 3, 299, 299), got {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype)
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1).float()  # (B, 2048)
        return ClassifierOutput(pool=pool, logits=self.logits_from_pool(pool))


# ----------------------------------------------------------------------------------------------------------------
# finding and reading the file


def _hub_candidates() -> list[Path]:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return [folder / PT_INCEPTION_FILENAME, folder / TORCH_FIDELITY_FILENAME]


def find_classifier_weights(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """Where the classifier weights are, without reading them.

    Order: ``path``, ``$FVQ_IS_INCEPTION_WEIGHTS``, torch.hub's checkpoint folder (pytorch-fid's and
    torch-fidelity's file names).

    Returns:
        ``(file, source)``; ``file`` is ``None`` when nothing was given or found, and ``source`` then says where fvq
        looked and how to provide the file.

    Raises:
        WeightsNotFoundError: ``path`` or the environment variable names a file that does not exist.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WeightsNotFoundError(
                f"classifier Inception weights not found at {p}; give pytorch-fid's {PT_INCEPTION_FILENAME} "
                f"({PT_INCEPTION_URL})"
            )
        return p, "the path argument"
    env = os.environ.get(IS_INCEPTION_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise WeightsNotFoundError(f"${IS_INCEPTION_ENV} is set to {p}, which is not a file")
        return p, f"${IS_INCEPTION_ENV}"
    for candidate in _hub_candidates():
        if candidate.is_file():
            return candidate, "torch.hub's checkpoint folder"
    looked = ", ".join(str(c) for c in _hub_candidates())
    return None, (
        f"the Inception Score needs the 1,008-class logits of the Inception classifier, which the FID Inception file "
        f"does not hold; give pytorch-fid's {PT_INCEPTION_FILENAME} (SHA-256 {PT_INCEPTION_SHA256[:16]}..., from "
        f"{PT_INCEPTION_URL}) with --inception-is PATH or ${IS_INCEPTION_ENV}. Looked in: ${IS_INCEPTION_ENV} (unset), "
        f"{looked} (absent)"
    )


def _expected_keys(model: ClassifierInception) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_state_dict_into(model: ClassifierInception, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copy a pytorch-fid-layout state dict into ``model``, refusing anything incomplete or foreign.

    ``*.num_batches_tracked`` entries are optional (older files lack them and eval mode never reads them).

    Raises:
        ValueError: Keys are missing or unexpected, or a tensor has the wrong shape; the message lists them.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{source} does not hold a state dict of tensors (got {type(state_dict).__name__}); give pytorch-fid's "
            f"{PT_INCEPTION_FILENAME}"
        )
    expected = _expected_keys(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if given[k].shape != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(given[k].shape)}, expected "
                f"{tuple(expected[k])})"
            )
        raise ValueError(
            f"{source} is not the Inception-with-classifier state dict fvq reads ({'; '.join(parts)}); it must be "
            f"pytorch-fid's {PT_INCEPTION_FILENAME} layout (torchvision Inception3 names, no AuxLogits, fc of "
            f"{NUM_CLASSES} classes)"
        )
    full = dict(model.state_dict())
    full.update({k: v.to(full[k].dtype) for k, v in given.items()})
    model.load_state_dict(full, strict=True)


def load_classifier_inception(
    path: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    device: torch.device | str = "cpu",
) -> ClassifierInception:
    """Find, verify and load the Inception classifier.

    Args:
        path: The weight file (else ``$FVQ_IS_INCEPTION_WEIGHTS``, else torch.hub's checkpoint folder).
        sha256: The SHA-256 the file must have (default: pytorch-fid's :data:`PT_INCEPTION_SHA256`); give another
            value only to use a different file on purpose.
        device: Where the network lives.

    Returns:
        An eval-mode :class:`ClassifierInception` with ``sha256`` and ``path`` set.

    Raises:
        WeightsNotFoundError: No file was given or found; the message says how to provide one.
        ValueError: Wrong checksum, or a file that is not this network's state dict.
    """
    file, source = find_classifier_weights(path)
    if file is None:
        raise WeightsNotFoundError(source)
    expected = (sha256 or PT_INCEPTION_SHA256).lower()
    actual = sha256_file(file)
    if actual != expected:
        hint = (
            "pass sha256= (fvq eval-gen --inception-is-sha256) with its checksum to use this different file on purpose"
            if expected == PT_INCEPTION_SHA256
            else "check the file and the checksum you gave"
        )
        raise ValueError(
            f"classifier Inception weights {file} (from {source}) have SHA-256 {actual}, expected {expected}: the file "
            f"is corrupt or not pytorch-fid's {PT_INCEPTION_FILENAME}; {hint}"
        )
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with objects, a truncated file, not a torch file
        raise ValueError(
            f"cannot read {file} as a tensor state dict with torch.load(weights_only=True): {err}"
        ) from err
    model = ClassifierInception()
    load_state_dict_into(model, state_dict, str(file))
    model.sha256, model.path = actual, file
    return model.to(device)


def shares_trunk(classifier: ClassifierInception, fid_network: nn.Module, *, atol: float = 1e-6) -> bool:
    """True when the classifier's 94 conv + batch-norm units hold the FID Inception's weights.

    Then the FID Inception's pool features are the classifier's, and its logits can be computed from them. Units are
    matched in the order both networks run them; batch-norm scales must be 1 (the graph has none).

    Args:
        classifier: The loaded classifier.
        fid_network: The FID Inception's TorchScript module (``FIDInception.network``).
        atol: Largest absolute difference accepted per value.
    """
    layers = getattr(getattr(fid_network, "net", None), "layers", None)
    if layers is None:
        return False
    params = [p for _, p in layers.named_parameters()]  # per unit: weight, beta, mean, var
    units = classifier.convolutions()
    if len(params) != 4 * len(units):
        return False
    for i, unit in enumerate(units):
        weight, beta, mean, var = params[4 * i : 4 * i + 4]
        ours = (unit.conv.weight, unit.bn.bias, unit.bn.running_mean, unit.bn.running_var)
        for a, b in zip(ours, (weight, beta, mean, var)):
            if a.shape != b.shape or not torch.allclose(a.float().cpu(), b.float().cpu(), rtol=0.0, atol=atol):
                return False
        if not torch.allclose(unit.bn.weight.float().cpu(), torch.ones(()), rtol=0.0, atol=atol):
            return False
    return True
