"""PatchGAN discriminator (Isola et al., 2017, "Image-to-Image Translation with Conditional Adversarial Networks",
https://arxiv.org/abs/1611.07004): pix2pix's ``NLayerDiscriminator``, as used by VQGAN, LlamaGen and FVQ.

Each output logit judges one receptive-field patch of the input (70x70 pixels for 3 layers). With the default 3
layers a 256x256 image gives a 30x30 logit map.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

__all__ = ["PatchGANDiscriminator"]

Norm = Literal["batch", "instance", "none"]


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """pix2pix ``NLayerDiscriminator``: strided 4x4 convs, normalisation, LeakyReLU(0.2), patch logits.

    Layout for ``num_layers=3``, ``base_channels=64``: conv 3->64 (stride 2, bias) + LReLU; conv 64->128 (s2) + norm
    + LReLU; conv 128->256 (s2) + norm + LReLU; conv 256->512 (s1) + norm + LReLU; conv 512->1 (s1, bias). Channel
    multipliers are capped at 8. Convolutions followed by a norm have no bias.

    Initialisation as the reference (pix2pix / taming / LlamaGen ``weights_init``): conv weights N(0, 0.02), norm
    weights N(1, 0.02), norm biases 0; the two biased convs keep PyTorch's default bias init.

    Args:
        in_channels: Image channels.
        base_channels: Channels of the first conv (``ndf``).
        num_layers: Number of stride-2 convs (``n_layers``); 3 in VQGAN/LlamaGen/FVQ.
        norm: ``"batch"`` (reference), ``"instance"`` or ``"none"``. Under DDP, BatchNorm statistics are per rank
            unless the trainer converts the module with ``nn.SyncBatchNorm.convert_sync_batchnorm``.
        kernel_size: Conv kernel size (4 in the reference).
        negative_slope: LeakyReLU slope (0.2 in the reference).

    Shapes:
        ``forward(images)``: ``(B, in_channels, H, W)`` -> logits ``(B, 1, h, w)``; for kernel 4 and ``num_layers``
        strided convs, ``h = H / 2**num_layers - 2`` (30 for 256 and 3 layers).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: Norm = "batch",
        kernel_size: int = 4,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        self.in_channels = in_channels
        self.num_layers = num_layers
        pad = 1 if kernel_size == 4 else kernel_size // 2
        use_bias = norm == "none"

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size, stride=2, padding=pad),
            nn.LeakyReLU(negative_slope, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(
                    base_channels * prev, base_channels * mult, kernel_size, stride=stride, padding=pad, bias=use_bias
                ),
                _norm_layer(norm, base_channels * mult),
                nn.LeakyReLU(negative_slope, inplace=True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, kernel_size, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: conv weights N(0, 0.02); norm weights N(1, 0.02) and biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits.

        Args:
            images: ``(B, in_channels, H, W)``.

        Returns:
            ``(B, 1, h, w)`` real-vs-fake logits, one per patch.
        """
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator input must be (B, {self.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        if min(self.output_size(images.shape[-2]), self.output_size(images.shape[-1])) < 1:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are too small for a {self.num_layers}-layer PatchGAN "
                f"(it would output no patch)"
            )
        return self.main(images)  # (B, 1, h, w)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side ``size`` (e.g. 30 for 256 with the default layout)."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                size = (size + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        return size
