"""The toy experiment of FVQ (Chang et al., ICLR 2026, Section 2 and Figure 2), as a library.

A *dynamic* vector-quantization toy: the target is a fixed optimisation objective and everything is trained with
plain SGD. There is no encoder network and no decoder: each encoder output ``z_e_i`` is a free, learnable vector
pulled towards its own fixed target ``p_i`` through the quantizer, so the only thing that differs between methods is
how the codebook is parameterised.

* Targets ``P``: ``num_targets`` points of dimension ``dim`` from a mixture of ``num_modes`` isotropic Gaussians
  whose centres lie on a circle of radius ``ring_radius`` in a random 2-D plane (for ``dim == 2`` the plane is the
  plane itself), so a 2-D view (PCA for ``dim > 2``) shows the structure.
* Latents ``Z``: the ``(N, D)`` encoder outputs ``z_e``, initialised ``N(0, latent_init_std^2)``.
* Objective (the VQN objective of the paper's eq. 3 with an identity decoder and an MSE task loss)::

      L = mean_i mean_d (z_q_st - p)^2  +  codebook_weight * mean (z_q - sg[z_e])^2
                                        +  commitment_weight * mean (z_e - sg[z_q])^2

  where ``z_q_st = z_e + sg[z_q - z_e]`` is the straight-through estimate (eq. 4) and the last two terms are the
  VQ-VAE codebook and commitment losses (eq. 5), computed by :class:`~fvq.quantizers.vq.VectorQuantizer`.
* Optimiser: full-batch SGD (no momentum). The latents are independent free variables and each one appears in the
  mean over N only once, so their learning rate is ``lr * num_targets``: every ``z_e_i`` then takes the step it would
  take alone in a one-point toy, whatever N is. The quantizer (raw codebook and projector) uses ``lr`` and sees the
  mean over the set, as in a real VQN. The LR follows FVQ's learning annealing
  (:func:`fvq.training.lr_schedule.annealing_factor`) unless ``annealing=False``.
* Methods, identical in everything else (same targets, same initial latents, same raw-codebook init, same LR):

  - ``"vq"``: plain straight-through VQ, no projector;
  - ``"linear"``: :class:`~fvq.quantizers.projectors.LinearProjector` (SimVQ / VQGAN-LC);
  - ``"vqbridge"``: :class:`~fvq.quantizers.vq_bridge.VQBridge` (a small one: ``bridge_hidden_dim`` wide).

Measured on the mapped codebook ``C = f(C_raw)`` (the codebook the search uses):

* ``usage``: fraction of the K codes that are the nearest code of at least one target ``p`` in ``P``;
* ``latent_usage``: the same over the current encoder outputs ``z_e`` (the codes training actually selects);
* ``distance``: ``D(P, C) = mean_{p in P} min_{c in C} ||p - c||`` (Section 3.1, Euclidean distance);
* ``latent_distance``: ``D(P_z, C)`` over the encoder outputs, i.e. the mean straight-through error ``||z_q - z_e||``
  (Challenge 1);
* ``perplexity``: ``exp`` of the entropy of the histogram of targets' nearest codes;
* ``task_loss``: ``mean ||z_q - p||^2 / D`` (what the objective actually optimises).

One tracked latent (row 0 of ``Z``) records its ``z_e`` and ``z_q`` at every step: the paper's spiral versus
piecewise-linear trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.projectors import LinearProjector
from fvq.quantizers.search import nearest_codes
from fvq.quantizers.usage import code_counts, usage_and_perplexity
from fvq.quantizers.vq import VectorQuantizer
from fvq.quantizers.vq_bridge import VQBridge
from fvq.training.lr_schedule import annealing_factor

METHODS: tuple[str, ...] = ("vq", "linear", "vqbridge")
METHOD_LABELS: dict[str, str] = {
    "vq": "VQ (STE only)",
    "linear": "VQ + linear projector",
    "vqbridge": "VQ + VQBridge",
}
CURVE_KEYS: tuple[str, ...] = (
    "usage",
    "latent_usage",
    "distance",
    "latent_distance",
    "perplexity",
    "task_loss",
    "lr_factor",
)


@dataclass
class ToyConfig:
    """Settings of the toy experiment (defaults: the documented run in ``docs/toy.md``).

    Args:
        steps: SGD steps per method.
        codebook_size: K.
        dim: Dimension D of targets, latents and codes.
        num_targets: N, size of the fixed target set ``P`` (and of the latent set ``Z``).
        num_modes: Gaussian components of the target mixture, centred on a circle.
        ring_radius: Radius of that circle.
        mode_std: Standard deviation of each component (isotropic in all D dimensions).
        latent_init_std: Standard deviation of the initial encoder outputs ``z_e``.
        lr: Peak SGD learning rate of the quantizer (raw codebook and projector); latents use ``lr * num_targets``.
        annealing: Use FVQ's learning annealing (warmup 10 % from 0.005, 30 % of the rest constant, linear decay to
            0.01); if False the LR is constant.
        commitment_weight: beta of the commitment loss (0.25).
        codebook_weight: Weight of the codebook loss (1.0).
        init_scale: Raw codebook init scale (uniform on ``[-s, s]``); ``None`` means ``1 / K``, the library default
            and the published FVQ init.
        bridge_hidden_dim: Token width of the VQBridge.
        bridge_depth: ViT blocks in the VQBridge.
        bridge_heads: Attention heads in the VQBridge.
        bridge_group_size: Codes per VQBridge token (must divide K); ``None`` picks the published default (16) if
            it divides K, else the largest power of two that does.
        methods: Which methods to run, a subset of ``("vq", "linear", "vqbridge")``.
        log_every: Evaluate the set-level metrics every this many steps (and at step 0 and the last step).
        seed: Seed of targets, latents and every model init; every method starts from the same state.
    """

    steps: int = 2000
    codebook_size: int = 256
    dim: int = 2
    num_targets: int = 4096
    num_modes: int = 8
    ring_radius: float = 1.0
    mode_std: float = 0.15
    latent_init_std: float = 0.1
    lr: float = 0.1
    annealing: bool = True
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    init_scale: float | None = None
    bridge_hidden_dim: int = 64
    bridge_depth: int = 2
    bridge_heads: int = 4
    bridge_group_size: int | None = None
    methods: tuple[str, ...] = METHODS
    log_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        positive = ("steps", "codebook_size", "dim", "num_targets", "num_modes", "log_every", "bridge_hidden_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToyConfig.{name} must be a positive integer, got {value!r}")
        for name in ("ring_radius", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ToyConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("mode_std", "latent_init_std", "commitment_weight", "codebook_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ToyConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.methods:
            raise ValueError(f"ToyConfig.methods must name at least one of {METHODS}, got an empty tuple")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"ToyConfig.methods must be distinct names from {METHODS}, got {self.methods}")
        if "vqbridge" in self.methods:
            group = self.group_size()
            if self.codebook_size % group:
                raise ValueError(
                    f"ToyConfig.bridge_group_size ({group}) must divide codebook_size ({self.codebook_size})"
                )
            if self.bridge_hidden_dim % self.bridge_heads:
                raise ValueError(
                    f"ToyConfig.bridge_hidden_dim ({self.bridge_hidden_dim}) must be divisible by bridge_heads "
                    f"({self.bridge_heads})"
                )

    def group_size(self) -> int:
        """The VQBridge group size actually used."""
        if self.bridge_group_size is not None:
            return self.bridge_group_size
        group = 16
        while self.codebook_size % group:
            group //= 2
        return group

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = list(self.methods)
        out["bridge_group_size_used"] = self.group_size() if "vqbridge" in self.methods else None
        return out


@dataclass
class MethodResult:
    """Outcome of one method.

    Attributes:
        method: ``"vq"``, ``"linear"`` or ``"vqbridge"``.
        final: Final metrics (keys of :data:`CURVE_KEYS` but ``lr_factor``, plus ``dead_codes`` and
            ``projector_params``).
        curves: Each key of :data:`CURVE_KEYS` -> values at the steps of :attr:`ToyResult.curve_steps`.
        trajectory_ze: ``(steps + 1, D)`` path of the tracked encoder output ``z_e`` (before each step, then final).
        trajectory_zq: ``(steps + 1, D)`` its quantized value ``z_q`` at the same moments.
        codes: ``(K, D)`` final mapped codebook.
        code_counts: ``(K,)`` how many targets pick each final code.
        seconds: Wall-clock time of the run.
    """

    method: str
    final: dict[str, float]
    curves: dict[str, list[float]]
    trajectory_ze: Tensor
    trajectory_zq: Tensor
    codes: Tensor
    code_counts: Tensor
    seconds: float


@dataclass
class ToyResult:
    """Outcome of :func:`run_toy`.

    Attributes:
        config: The configuration that produced it.
        targets: ``(N, D)`` the fixed target set ``P``.
        tracked_target: ``(D,)`` target of the tracked latent.
        curve_steps: Steps at which curves were evaluated (0, every ``log_every``, and ``steps``).
        methods: Method name -> :class:`MethodResult`, in the order run.
    """

    config: ToyConfig
    targets: Tensor
    tracked_target: Tensor
    curve_steps: list[int]
    methods: dict[str, MethodResult] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: config, curve steps, per-method final metrics and curves (no tensors but the trajectory)."""
        return {
            "config": self.config.as_dict(),
            "curve_steps": list(self.curve_steps),
            "tracked_target": self.tracked_target.tolist(),
            "methods": {
                name: {
                    "label": METHOD_LABELS[name],
                    "final": r.final,
                    "curves": r.curves,
                    "seconds": r.seconds,
                    "trajectory": {"z_e": r.trajectory_ze.tolist(), "z_q": r.trajectory_zq.tolist()},
                }
                for name, r in self.methods.items()
            },
        }


# --------------------------------------------------------------------------------------------------------------------
# Data
def make_targets(config: ToyConfig, generator: torch.Generator) -> Tensor:
    """The fixed target set ``P``: a ring of Gaussian modes in a random 2-D plane of R^D.

    Args:
        config: Uses ``num_targets``, ``dim``, ``num_modes``, ``ring_radius``, ``mode_std``.
        generator: Source of randomness.

    Returns:
        ``(N, D)`` float32 targets.
    """
    n, d = config.num_targets, config.dim
    if d == 2:
        plane = torch.eye(2)
    else:
        plane, _ = torch.linalg.qr(torch.randn(d, 2, generator=generator))  # (D, 2) orthonormal columns
        plane = plane.t()  # (2, D)
    angles = 2 * math.pi * torch.arange(config.num_modes) / config.num_modes
    centres_2d = config.ring_radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (M, 2)
    centres = centres_2d @ plane  # (M, D)
    mode = torch.randint(config.num_modes, (n,), generator=generator)  # (N,)
    noise = config.mode_std * torch.randn(n, d, generator=generator)  # (N, D)
    return (centres[mode] + noise).float()  # (N, D)


# --------------------------------------------------------------------------------------------------------------------
# Models
def build_quantizer(method: str, config: ToyConfig) -> VectorQuantizer:
    """The real fvq quantizer for ``method`` (global RNG draws its init: seed before calling).

    Args:
        method: One of :data:`METHODS`.
        config: Toy settings.
    """
    k, d = config.codebook_size, config.dim
    if method == "vq":
        projector = None
    elif method == "linear":
        projector = LinearProjector(d)
    elif method == "vqbridge":
        projector = VQBridge(
            k,
            d,
            group_size=config.group_size(),
            hidden_dim=config.bridge_hidden_dim,
            depth=config.bridge_depth,
            num_heads=config.bridge_heads,
        )
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return VectorQuantizer(
        k,
        d,
        commitment_weight=config.commitment_weight,
        codebook_weight=config.codebook_weight,
        init_scale=config.init_scale,
        projector=projector,
    )


# --------------------------------------------------------------------------------------------------------------------
# Metrics
@torch.no_grad()
def set_metrics(targets: Tensor, latents: Tensor, codes: Tensor) -> dict[str, float]:
    """Set-level codebook metrics of Section 3.1.

    Args:
        targets: ``(N, D)`` target set ``P``.
        latents: ``(N, D)`` encoder outputs ``z_e`` (row i is trained towards ``targets[i]``).
        codes: ``(K, D)`` mapped codebook.

    Returns:
        ``usage``, ``latent_usage``, ``distance`` (``D(P, C)``), ``latent_distance`` (``D(P_z, C)``),
        ``perplexity``, ``task_loss`` and ``dead_codes`` (codes no target picks).
    """
    if targets.shape != latents.shape or targets.ndim != 2 or codes.ndim != 2 or codes.shape[1] != targets.shape[1]:
        raise ValueError(
            f"set_metrics expects targets and latents (N, D) and codes (K, D); got {tuple(targets.shape)}, "
            f"{tuple(latents.shape)} and {tuple(codes.shape)}"
        )
    k = codes.shape[0]
    idx_p = nearest_codes(targets, codes)  # (N,)
    idx_z = nearest_codes(latents, codes)  # (N,)
    counts_p = code_counts(idx_p, k)  # (K,)
    usage, perplexity = usage_and_perplexity(counts_p)
    latent_usage, _ = usage_and_perplexity(code_counts(idx_z, k))
    z_q = codes[idx_z]  # (N, D)
    return {
        "usage": float(usage),
        "latent_usage": float(latent_usage),
        "distance": float((targets - codes[idx_p]).norm(dim=1).mean()),
        "latent_distance": float((latents - z_q).norm(dim=1).mean()),
        "perplexity": float(perplexity),
        "task_loss": float(F.mse_loss(z_q, targets)),
        "dead_codes": float(k - int((counts_p > 0).sum())),
    }


# --------------------------------------------------------------------------------------------------------------------
# Training
def curve_steps(steps: int, log_every: int) -> list[int]:
    """Steps at which the set-level metrics are evaluated: 0, every ``log_every``, and ``steps`` (after the last)."""
    points = list(range(0, steps, log_every))
    return points + [steps]


def train_method(
    method: str,
    config: ToyConfig,
    targets: Tensor,
    initial_latents: Tensor,
    *,
    progress: Callable[[int], None] | None = None,
) -> MethodResult:
    """Train one method from the shared initial state and record its curves and trajectory.

    Args:
        method: One of :data:`METHODS`.
        config: Toy settings.
        targets: ``(N, D)`` fixed targets.
        initial_latents: ``(N, D)`` initial encoder outputs (copied, not modified).
        progress: Called with the number of steps just done (for a progress bar).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed + 1)  # same raw codebook for every method; projector inits drawn after it
    quantizer = build_quantizer(method, config).train()
    latents = nn.Parameter(initial_latents.clone())  # z_e, (N, D)
    n = targets.shape[0]
    optimizer = torch.optim.SGD(
        [
            {"params": list(quantizer.parameters()), "lr": config.lr, "base_lr": config.lr},
            # each z_e_i enters the mean over N once: scale by N so it moves as a lone point would
            {"params": [latents], "lr": config.lr * n, "base_lr": config.lr * n},
        ],
        lr=config.lr,
    )
    log_at = set(curve_steps(config.steps, config.log_every))
    curves: dict[str, list[float]] = {key: [] for key in CURVE_KEYS}
    path_ze: list[Tensor] = []
    path_zq: list[Tensor] = []

    def lr_factor(step: int) -> float:
        return annealing_factor(step, config.steps) if config.annealing else 1.0

    def record(step: int, codes: Tensor) -> None:
        metrics = set_metrics(targets, latents.detach(), codes)
        for key in CURVE_KEYS:
            curves[key].append(lr_factor(min(step, config.steps - 1)) if key == "lr_factor" else metrics[key])

    for step in range(config.steps):
        # 1. the LR of this step: a pure function of the step
        factor = lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        # 2. quantize every encoder output with the current (mapped) codebook
        out = quantizer(latents)  # quantized (N, D) with straight-through gradients; indices (N,)
        # 3. task loss through the straight-through estimate, plus the codebook and commitment losses
        task = F.mse_loss(out.quantized, targets)
        loss = task + out.loss
        # 4. record the state this step starts from: the tracked point and, every log_every steps, the set metrics
        with torch.no_grad():
            path_ze.append(latents[0].detach().clone())
            path_zq.append(out.quantized[0].detach().clone())
            if step in log_at:
                record(step, quantizer.codebook_vectors().detach())  # (K, D)
        # 5. one plain SGD step on latents, raw codebook and projector
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy run '{method}' diverged at step {step} (loss {float(loss)}); lower lr")
        if progress is not None:
            progress(1)

    with torch.no_grad():
        codes = quantizer.codebook_vectors().detach().clone()  # (K, D)
        final_idx = nearest_codes(latents[:1].detach(), codes)  # (1,)
        path_ze.append(latents[0].detach().clone())
        path_zq.append(codes[final_idx[0]].clone())
        record(config.steps, codes)
        final = set_metrics(targets, latents.detach(), codes)
        counts = code_counts(nearest_codes(targets, codes), config.codebook_size)
    projector = quantizer.projector
    final["projector_params"] = float(sum(p.numel() for p in projector.parameters())) if projector else 0.0
    return MethodResult(
        method=method,
        final=final,
        curves=curves,
        trajectory_ze=torch.stack(path_ze),
        trajectory_zq=torch.stack(path_zq),
        codes=codes,
        code_counts=counts,
        seconds=time.perf_counter() - start,
    )


def run_toy(config: ToyConfig | None = None, *, progress: bool = False) -> ToyResult:
    """Run every method of ``config.methods`` on the same targets and initial latents.

    Seeded and deterministic on a given machine: targets, latents and all inits come from ``config.seed``.
    Uses the global torch RNG (seeded here) for module inits.

    Args:
        config: Settings (defaults if None).
        progress: Show a tqdm bar per method (rate and ETA) on stderr.

    Returns:
        A :class:`ToyResult`.
    """
    config = config or ToyConfig()
    generator = torch.Generator().manual_seed(config.seed)
    targets = make_targets(config, generator)  # (N, D)
    initial_latents = config.latent_init_std * torch.randn(config.num_targets, config.dim, generator=generator)
    result = ToyResult(
        config=config,
        targets=targets,
        tracked_target=targets[0].clone(),
        curve_steps=curve_steps(config.steps, config.log_every),
    )
    for method in config.methods:
        if progress:
            from tqdm.auto import tqdm

            with tqdm(total=config.steps, desc=f"{method:>8}", unit="step", dynamic_ncols=True) as bar:
                result.methods[method] = train_method(method, config, targets, initial_latents, progress=bar.update)
        else:
            result.methods[method] = train_method(method, config, targets, initial_latents)
    return result


# --------------------------------------------------------------------------------------------------------------------
# Report
def format_table(result: ToyResult) -> str:
    """A plain-text table of the final metrics, one row per method."""
    header = (
        f"{'method':<24} {'usage':>7} {'z_e usage':>9} {'D(P,C)':>8} {'D(Pz,C)':>8} {'perplexity':>10} "
        f"{'task MSE':>9} {'params':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, r in result.methods.items():
        f = r.final
        lines.append(
            f"{METHOD_LABELS[name]:<24} {f['usage']:>6.1%} {f['latent_usage']:>9.1%} {f['distance']:>8.4f} "
            f"{f['latent_distance']:>8.4f} {f['perplexity']:>10.1f} {f['task_loss']:>9.5f} "
            f"{int(f['projector_params']):>8d}"
        )
    return "\n".join(lines)


def _project_2d(targets: Tensor) -> Callable[[Tensor], Tensor]:
    """A map ``(M, D) -> (M, 2)``: identity for D = 2, else the top-2 principal axes of the targets (PCA)."""
    if targets.shape[1] == 2:
        return lambda x: x
    mean = targets.mean(dim=0, keepdim=True)  # (1, D)
    _, _, v = torch.linalg.svd(targets - mean, full_matrices=False)  # v: (D, D)
    axes = v[:2].t()  # (D, 2)
    return lambda x: (x - mean) @ axes


def save_figures(result: ToyResult, out_dir: Any, prefix: str = "") -> list[str]:
    """Write the trajectory, usage-curve and code-view figures (PNG, matplotlib Agg).

    Args:
        result: A finished run.
        out_dir: Folder (``str`` or ``Path``), created if missing.
        prefix: Prepended to each file name (``"toy_"`` for the docs figures).

    Returns:
        The written paths.
    """
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names: Sequence[str] = list(result.methods)
    project = _project_2d(result.targets)
    view = "" if result.config.dim == 2 else " (PCA of the targets)"
    target_2d = project(result.targets)  # (N, 2)
    paths: list[str] = []

    # 1. trajectory of the tracked z_e and its z_q, one panel per method
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 5.0), squeeze=False)
    tracked = project(result.tracked_target[None])[0]
    for ax, name in zip(axes[0], names):
        r = result.methods[name]
        ze, zq = project(r.trajectory_ze), project(r.trajectory_zq)  # (T, 2)
        ax.scatter(target_2d[:, 0], target_2d[:, 1], s=1, c="0.85", rasterized=True, label="targets P")
        ax.plot(zq[:, 0], zq[:, 1], "-", color="0.5", lw=0.4, alpha=0.35, zorder=2)
        order = torch.arange(zq.shape[0])
        ax.scatter(zq[:, 0], zq[:, 1], s=5, c=order, cmap="autumn", zorder=3, label="$z_q$ (yellow = late)")
        ax.plot(ze[:, 0], ze[:, 1], "-", color="tab:blue", lw=1.0, zorder=4, label="$z_e$")
        ax.scatter(*ze[0], marker="o", s=40, facecolor="white", edgecolor="tab:blue", zorder=5, label="start")
        ax.scatter(*tracked, marker="*", s=160, color="tab:red", zorder=6, label="target")
        pts = torch.cat([ze, zq, tracked[None]])  # square window around the whole path
        centre = (pts.min(0).values + pts.max(0).values) / 2
        half = 1.08 * max(float((pts.max(0).values - pts.min(0).values).max()) / 2, 0.2)
        ax.set_xlim(float(centre[0]) - half, float(centre[0]) + half)
        ax.set_ylim(float(centre[1]) - half, float(centre[1]) + half)
        err = r.curves["latent_distance"]
        ax.set_title(f"{METHOD_LABELS[name]}\nfinal D(P_z, C) = mean |z_q - z_e| = {err[-1]:.3f}", fontsize=10)
        ax.set_aspect("equal", adjustable="box")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Trajectory of one encoder output pulled to a fixed target{view}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    paths.append(str(out / f"{prefix}trajectories.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. usage and D(P, C) over steps, all methods
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = result.curve_steps
    for name in names:
        c = result.methods[name].curves
        axes[0].plot(steps, c["usage"], label=METHOD_LABELS[name])
        axes[1].plot(steps, c["distance"], label=METHOD_LABELS[name])
        axes[2].plot(steps, c["latent_distance"], label=METHOD_LABELS[name])
    axes[0].set_ylabel("usage over targets P")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylabel("D(P, C)")
    axes[2].set_ylabel("D(P_z, C) = mean |z_q - z_e|")
    for ax in axes[1:]:
        ax.set_yscale("log")
    if result.config.annealing:
        lr_ax = axes[0].twinx()
        lr_ax.plot(steps, result.methods[names[0]].curves["lr_factor"], color="0.6", ls=":", lw=1)
        lr_ax.set_ylabel("LR factor (dotted)", color="0.5")
        lr_ax.set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"K = {result.config.codebook_size}, D = {result.config.dim}, N = {result.config.num_targets}")
    fig.tight_layout()
    paths.append(str(out / f"{prefix}usage.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. final codes vs targets, one panel per method
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = result.methods[name]
        codes_2d = project(r.codes)  # (K, 2)
        used = r.code_counts > 0
        ax.scatter(target_2d[:, 0], target_2d[:, 1], s=1, c="0.8", rasterized=True, label="targets P")
        ax.scatter(codes_2d[~used, 0], codes_2d[~used, 1], s=8, marker="x", c="tab:red", lw=0.7, label="unused")
        ax.scatter(codes_2d[used, 0], codes_2d[used, 1], s=8, c="tab:blue", label="used")
        ax.set_title(
            f"{METHOD_LABELS[name]}\nusage {r.final['usage']:.1%}, D(P, C) = {r.final['distance']:.3f}",
            fontsize=10,
        )
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][0].legend(loc="best", fontsize=7, markerscale=2)
    fig.suptitle(f"Final codebook f(C) vs targets{view}", fontsize=11)
    fig.tight_layout()
    paths.append(str(out / f"{prefix}codes.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
