"""Vector quantizer with an explicit codebook and an optional codebook projector.

VQ-VAE: van den Oord et al., 2017, https://arxiv.org/abs/1711.00937 .
With ``projector=VQBridge(...)`` this is the quantizer of FVQ (Chang et al., ICLR 2026): the raw codebook ``C`` is
mapped to ``f(C)`` at every forward pass and the search runs on the mapped codebook; :meth:`VectorQuantizer.export`
computes ``f(C)`` once and returns a plain quantizer holding it.

Codebook dynamics and objectives, each off by default (the default is the plain VQ-VAE / FVQ quantizer):

* ``codebook_update="ema"``: EMA codebook (van den Oord et al., 2017; Razavi et al., 2019),
  :mod:`fvq.quantizers.codebook_dynamics`.
* ``kmeans_init=True``: k-means codebook initialisation on the first batches, :mod:`fvq.quantizers.kmeans`; with
  ``kmeans_source={"type": "features", ...}`` on the features of a pretrained image encoder instead (VQGAN-LC),
  :mod:`fvq.quantizers.feature_init`.
* ``freeze_codebook=True``: the raw codebook is a buffer that no optimizer sees (SimVQ, VQGAN-LC: a frozen codebook
  and a trained projector).
* ``restart_strategy="random" | "highest_error" | "split"``: dead-code restarts,
  :mod:`fvq.quantizers.codebook_dynamics`.
* ``estimator="ste" | "rotation" | "ibq" | "soft" | "gumbel"``: gradient estimator, :mod:`fvq.quantizers.estimators`.
* ``entropy_weight``, ``orthogonality_weight``, ``variance_weight``, ``covariance_weight``,
  ``variance_hinge_weight``, ``repulsion_weight``, ``contrastive_weight``: auxiliary objectives,
  :mod:`fvq.quantizers.objectives`.

Data-dependent codebook changes (k-means, restarts, EMA) happen only in training mode, are computed identically or on
rank 0 and broadcast under ``torch.distributed``, so every rank holds the same codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.distributed import broadcast_, is_main_process
from fvq.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    channels_last_flat,
    check_indices,
    restore_layout,
    weighted_total,
)
from fvq.quantizers.codebook_dynamics import (
    DeadCodeRestarter,
    RestartPlan,
    batch_cluster_statistics,
    ema_codebook_update_,
    flush_subnormals_,
)
from fvq.quantizers.estimators import (
    ESTIMATORS,
    annealed_temperature,
    gumbel_quantize,
    index_backprop_quantize,
    rotation_trick,
    soft_quantize,
)
from fvq.quantizers.feature_init import check_kmeans_source, feature_codebook, feature_dim, source_features
from fvq.quantizers.functional import straight_through
from fvq.quantizers.kmeans import SEEDINGS, kmeans
from fvq.quantizers.objectives import (
    codebook_covariance_loss,
    codebook_repulsion_loss,
    codebook_variance_hinge_loss,
    codebook_variance_loss,
    contrastive_codebook_loss,
    orthogonality_loss,
    soft_assignment_entropy,
)
from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES, nearest_codes
from fvq.quantizers.usage import code_counts, usage_and_perplexity

DISTANCES = ("l2", "cosine")
INITS = ("uniform", "normal")
CODEBOOK_UPDATES = ("gradient", "ema")


class VectorQuantizer(Quantizer):
    """Nearest-code vector quantizer with straight-through gradients.

    Losses (unweighted in ``losses``, weighted in ``loss``): ``codebook = mean((z_q - sg[z])^2)`` and
    ``commitment = mean((sg[z_q] - z)^2)``, weighted by ``codebook_weight`` and ``commitment_weight``. Optional terms,
    present only when their weight is non-zero: ``entropy`` (``sample_entropy - entropy_diversity_weight *
    batch_entropy`` of soft assignments), ``orthogonality``, ``codebook_variance``, ``codebook_covariance``,
    ``codebook_variance_hinge``, ``repulsion``, ``contrastive``. With a frozen codebook and no projector there is no
    ``codebook`` term (nothing it could train).

    Args:
        codebook_size: Number of codes K.
        codebook_dim: Channels D of the codes and of the input.
        commitment_weight: beta in front of the commitment term (0.25 as in VQ-VAE and FVQ).
        codebook_weight: Weight of the codebook term (unused with ``codebook_update="ema"``, which has no such term).
        distance: ``"l2"`` (squared Euclidean, as FVQ) or ``"cosine"`` (codes and inputs l2-normalised first,
            as LlamaGen's default).
        init: Raw codebook initialisation, ``"uniform"`` on ``[-init_scale, init_scale]`` or ``"normal"`` with std
            ``init_scale``.
        init_scale: Scale of the initialisation; ``None`` means ``1 / codebook_size`` (the published FVQ init).
        projector: Optional module mapping the raw ``(K, D)`` codebook to the ``(K, D)`` codebook used for search and
            lookup (``LinearProjector``, ``MLPProjector``, ``VQBridge``), trained jointly. Not combinable with EMA
            updates, k-means init on latents or restarts, which write code vectors directly during training.
        max_chunk_bytes: Memory bound of one distance block in the nearest-code search (and of the ``N x K`` logits
            blocks of the soft estimators and the entropy term).
        estimator: Gradient through the assignment in training: ``"ste"`` (straight-through), ``"rotation"``
            (rotation trick), ``"ibq"`` (index backpropagation), ``"soft"`` (softmax mixture) or ``"gumbel"``
            (straight-through Gumbel-softmax). Eval mode always uses the nearest code.
        temperature: tau of ``"ibq"``, ``"soft"`` and ``"gumbel"`` at step 0.
        temperature_final: tau reached after ``temperature_anneal_steps`` (exponential schedule); ``None``: constant.
        temperature_anneal_steps: Length of the temperature schedule, in steps told by :meth:`set_step`.
        codebook_update: ``"gradient"`` (codebook is a parameter trained by the codebook loss) or ``"ema"`` (codebook
            is a buffer updated by exponential moving averages of assigned latents).
        ema_decay: gamma of the EMA update.
        ema_epsilon: eps of the EMA division / Laplace smoothing.
        ema_laplace_smoothing: Laplace-smooth the EMA cluster sizes (Sonnet) instead of ``M / (N + eps)``.
        kmeans_init: Initialise the codebook by k-means on the latents of the first training batches (once; the
            ``initted`` buffer records it in the state dict).
        kmeans_iters: Lloyd iterations.
        kmeans_batches: Training batches whose latents are pooled before k-means runs (at least K latents are
            collected in any case; the batches' outputs use the initial codebook until then).
        kmeans_max_samples: Cap on the pooled latents (random subset); ``None``: all.
        kmeans_seeding: ``"kmeans++"`` or ``"random"``.
        kmeans_source: What k-means clusters: ``"latents"`` (this quantizer's inputs) or a features source
            ``{"type": "features", "encoder": "vgg16", "layer": ..., "images": {dataset config}, "num_images": ...,
            "batch_size": ..., "seed": ...}`` (VQGAN-LC; see :mod:`fvq.quantizers.feature_init`). Features are
            computed on the first training forward pass, before any search, so they may seed the raw codebook of a
            projector; the raw codebook then has the features' width C, and ``C != codebook_dim`` needs a projector
            mapping C to D (the config builder gives a ``linear`` projector ``input_dim=C``).
        freeze_codebook: Keep the raw codebook fixed: it is a buffer (same state-dict key), so no optimizer updates
            it; initialisation (random, or k-means when ``kmeans_init``) still writes it once. With a projector the
            codebook loss trains the projector (SimVQ: frozen codebook + linear projector). Refused with EMA updates
            and restarts, which exist to move codes.
        restart_strategy: ``None`` (no restarts), ``"random"``, ``"highest_error"`` or ``"split"``.
        restart_threshold: A code is dead when its EMA usage (assignments per step over all ranks) is below this.
        restart_every: Check for dead codes every this many training steps.
        restart_usage_decay: Decay of the usage EMA.
        restart_buffer_size: Rows of the per-rank buffer of recent latents used for reseeding.
        restart_noise: Std of the noise added to reseeded codes, relative to the latents' RMS.
        entropy_weight: Weight of the soft-assignment entropy term (0: not computed).
        entropy_temperature: tau of the soft assignment of the entropy term.
        entropy_diversity_weight: Weight of the batch entropy inside the entropy term.
        orthogonality_weight: Weight of the codebook orthogonality term (0: not computed).
        orthogonality_max_codes: Codes subsampled per step for the orthogonality term.
        variance_weight: Weight of the VICReg variance hinge on the codebook (0: not computed).
        variance_target: Target per-dimension std of the codebook.
        covariance_weight: Weight of the VICReg covariance term on the codebook (0: not computed).
        variance_hinge_weight: Weight of the plain variance hinge ``max(0, gamma - Var)`` on the codebook (0: not
            computed).
        variance_hinge_target: gamma, the target mean per-dimension variance of the codebook.
        repulsion_weight: Weight of the Gaussian-kernel repulsion between codes (0: not computed).
        repulsion_temperature: tau of ``exp(-||e_i - e_j||^2 / tau)``.
        repulsion_max_codes: Codes subsampled per step for the repulsion term.
        contrastive_weight: Weight of the InfoNCE term between each input and its assigned code (0: not computed).
        contrastive_temperature: tau of the InfoNCE logits ``z . e_k / tau``.
    """

    # The config keys that :meth:`export` keeps: everything else (projector, EMA, k-means, restarts, estimators,
    # auxiliary objectives) is training-only and folded away.
    INFERENCE_KEYS = (
        "codebook_size",
        "codebook_dim",
        "commitment_weight",
        "codebook_weight",
        "distance",
        "max_chunk_bytes",
    )

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        distance: str = "l2",
        init: str = "uniform",
        init_scale: float | None = None,
        projector: nn.Module | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        estimator: str = "ste",
        temperature: float = 1.0,
        temperature_final: float | None = None,
        temperature_anneal_steps: int = 0,
        codebook_update: str = "gradient",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        ema_laplace_smoothing: bool = True,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_batches: int = 1,
        kmeans_max_samples: int | None = None,
        kmeans_seeding: str = "kmeans++",
        restart_strategy: str | None = None,
        restart_threshold: float = 1.0,
        restart_every: int = 100,
        restart_usage_decay: float = 0.99,
        restart_buffer_size: int = 4096,
        restart_noise: float = 0.01,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 1.0,
        entropy_diversity_weight: float = 1.0,
        orthogonality_weight: float = 0.0,
        orthogonality_max_codes: int = 1024,
        variance_weight: float = 0.0,
        variance_target: float = 1.0,
        covariance_weight: float = 0.0,
        variance_hinge_weight: float = 0.0,
        variance_hinge_target: float = 1.0,
        repulsion_weight: float = 0.0,
        repulsion_temperature: float = 1.0,
        repulsion_max_codes: int = 1024,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.07,
        kmeans_source: str | dict = "latents",
        freeze_codebook: bool = False,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        features_source = check_kmeans_source(kmeans_source)
        raw_dim = codebook_dim if features_source is None else feature_dim(features_source)
        _check_options(
            projector=projector,
            estimator=estimator,
            temperature=temperature,
            temperature_final=temperature_final,
            codebook_update=codebook_update,
            ema_decay=ema_decay,
            ema_epsilon=ema_epsilon,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            kmeans_batches=kmeans_batches,
            kmeans_max_samples=kmeans_max_samples,
            kmeans_seeding=kmeans_seeding,
            restart_strategy=restart_strategy,
            features_source=features_source,
            freeze_codebook=freeze_codebook,
            raw_dim=raw_dim,
            codebook_dim=codebook_dim,
            temperatures={
                "repulsion_temperature": repulsion_temperature,
                "contrastive_temperature": contrastive_temperature,
            },
            weights={
                "commitment_weight": commitment_weight,
                "codebook_weight": codebook_weight,
                "entropy_weight": entropy_weight,
                "orthogonality_weight": orthogonality_weight,
                "variance_weight": variance_weight,
                "covariance_weight": covariance_weight,
                "variance_hinge_weight": variance_hinge_weight,
                "repulsion_weight": repulsion_weight,
                "contrastive_weight": contrastive_weight,
            },
        )
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.distance = distance
        self.max_chunk_bytes = max_chunk_bytes
        self.estimator = estimator
        self.temperature = temperature
        self.temperature_final = temperature_final
        self.temperature_anneal_steps = temperature_anneal_steps
        self.step = 0
        self.codebook_update = codebook_update
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.ema_laplace_smoothing = ema_laplace_smoothing
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.kmeans_batches = kmeans_batches
        self.kmeans_max_samples = kmeans_max_samples
        self.kmeans_seeding = kmeans_seeding
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.entropy_diversity_weight = entropy_diversity_weight
        self.orthogonality_weight = orthogonality_weight
        self.orthogonality_max_codes = orthogonality_max_codes
        self.variance_weight = variance_weight
        self.variance_target = variance_target
        self.covariance_weight = covariance_weight
        self.variance_hinge_weight = variance_hinge_weight
        self.variance_hinge_target = variance_hinge_target
        self.repulsion_weight = repulsion_weight
        self.repulsion_temperature = repulsion_temperature
        self.repulsion_max_codes = repulsion_max_codes
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.features_source = features_source
        self.freeze_codebook = freeze_codebook
        self.raw_dim = raw_dim

        scale = 1.0 / codebook_size if init_scale is None else init_scale
        weight = torch.empty(codebook_size, raw_dim)
        if init == "uniform":
            nn.init.uniform_(weight, -scale, scale)
        else:
            nn.init.normal_(weight, std=scale)
        if codebook_update == "ema":
            # the codebook follows the data through EMA statistics, not through gradients
            self.register_buffer("codebook", weight)  # raw codebook C, (K, D)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))  # N, (K,): one pseudo-count per code
            self.register_buffer("ema_embed_sum", weight.clone())  # M, (K, D): so that M / N = C at the start
        elif freeze_codebook:
            self.register_buffer("codebook", weight)  # raw codebook C, (K, raw_dim): no optimizer sees it
        else:
            self.codebook = nn.Parameter(weight)  # raw codebook C, (K, D)
        self.projector = projector
        if kmeans_init:
            self.register_buffer("initted", torch.zeros((), dtype=torch.bool))
            self._kmeans_pool: list[Tensor] = []
            self._kmeans_pool_batches = 0
        self.restarter = (
            None
            if restart_strategy is None
            else DeadCodeRestarter(
                codebook_size,
                codebook_dim,
                strategy=restart_strategy,
                threshold=restart_threshold,
                every=restart_every,
                usage_decay=restart_usage_decay,
                buffer_size=restart_buffer_size,
                noise=restart_noise,
                max_chunk_bytes=max_chunk_bytes,
            )
        )

    # ----------------------------------------------------------------------------------------------------------------
    def codebook_vectors(self) -> Tensor:
        """The codebook used for search and lookup, ``(K, D)``: ``f(C)`` with a projector, else ``C``."""
        codes = self.codebook if self.projector is None else self.projector(self.codebook)
        if codes.shape != (self.codebook_size, self.codebook_dim):
            raise RuntimeError(
                f"projector must map the ({self.codebook_size}, {self.raw_dim}) raw codebook to "
                f"({self.codebook_size}, {self.codebook_dim}), got {tuple(codes.shape)}"
            )
        if self.distance == "cosine":
            codes = F.normalize(codes, dim=-1)
        return codes

    def set_step(self, step: int) -> None:
        """Tell the quantizer the training step (drives the temperature schedule; a pure function of the step)."""
        super().set_step(step)
        self.step = int(step)

    def current_temperature(self) -> float:
        """tau of the soft estimators at the step last given to :meth:`set_step`."""
        return annealed_temperature(self.step, self.temperature, self.temperature_final, self.temperature_anneal_steps)

    def _prepare(self, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        return flat, grid

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = self._prepare(z)  # (N, D)
        restarted = self._maintain_codebook(flat) if self.training else 0  # k-means init, dead-code restarts
        codes = self.codebook_vectors()  # (K, D)
        if self.codebook_update == "ema" and self.training:
            codes = codes.clone()  # the EMA update below rewrites the buffer; keep this step's graph intact
        nearest = nearest_codes(flat, codes, self.max_chunk_bytes)  # (N,)
        quantized, indices = self._estimate(flat, codes, nearest)  # (N, D), (N,)
        z_q = codes.index_select(0, indices).to(flat.dtype)  # (N, D), differentiable w.r.t. the codebook
        losses = self._losses(flat, z_q, codes, nearest)
        loss = weighted_total(losses, self._loss_weights(), like=flat.float())
        metrics = batch_code_metrics(indices, self.codebook_size)
        if self.training:
            self._track_codebook(flat, indices)  # EMA update and usage statistics, after the graph is built
            if self.restarter is not None:
                metrics["restarted"] = flat.new_tensor(float(restarted))
                metrics["restarted_total"] = self.restarter.restarted_total.detach().float()
        if self.estimator in ("ibq", "soft", "gumbel") and self.training:
            metrics["temperature"] = flat.new_tensor(self.current_temperature())
        return QuantizerOutput(
            quantized=restore_layout(quantized, grid),
            indices=indices.reshape(grid),
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    # ---- forward pieces ----------------------------------------------------------------------------------------
    def _estimate(self, flat: Tensor, codes: Tensor, nearest: Tensor) -> tuple[Tensor, Tensor]:
        """Quantized vectors with the configured gradient, and the indices they encode: ``(N, D)``, ``(N,)``."""
        if not self.training or self.estimator == "ste":
            return straight_through(flat, codes.index_select(0, nearest).to(flat.dtype)), nearest
        tau = self.current_temperature()
        if self.estimator == "rotation":
            return rotation_trick(flat, codes.index_select(0, nearest).to(flat.dtype)), nearest
        if self.estimator == "ibq":
            return index_backprop_quantize(flat, codes, nearest, tau, self.max_chunk_bytes).to(flat.dtype), nearest
        if self.estimator == "soft":
            return soft_quantize(flat, codes, tau, self.max_chunk_bytes), nearest
        quantized, sampled = gumbel_quantize(flat, codes, tau, self.max_chunk_bytes)  # "gumbel"
        return quantized.to(flat.dtype), sampled

    def _losses(self, flat: Tensor, z_q: Tensor, codes: Tensor, nearest: Tensor) -> dict[str, Tensor]:
        """Named unweighted loss terms; terms with weight 0 are not computed."""
        losses: dict[str, Tensor] = {}
        if self.codebook_update == "gradient" and not (self.freeze_codebook and self.projector is None):
            losses["codebook"] = F.mse_loss(z_q.float(), flat.detach().float())
        losses["commitment"] = F.mse_loss(flat.float(), z_q.detach().float())
        if self.entropy_weight:
            ent = soft_assignment_entropy(flat, codes, self.entropy_temperature, self.max_chunk_bytes)
            losses["entropy"] = ent.sample_entropy - self.entropy_diversity_weight * ent.batch_entropy
        if self.orthogonality_weight:
            losses["orthogonality"] = orthogonality_loss(codes, self.orthogonality_max_codes)
        if self.variance_weight:
            losses["codebook_variance"] = codebook_variance_loss(codes, self.variance_target)
        if self.covariance_weight:
            losses["codebook_covariance"] = codebook_covariance_loss(codes)
        if self.variance_hinge_weight:
            losses["codebook_variance_hinge"] = codebook_variance_hinge_loss(codes, self.variance_hinge_target)
        if self.repulsion_weight:
            losses["repulsion"] = codebook_repulsion_loss(codes, self.repulsion_temperature, self.repulsion_max_codes)
        if self.contrastive_weight:
            losses["contrastive"] = contrastive_codebook_loss(
                flat, codes, nearest, self.contrastive_temperature, self.max_chunk_bytes
            )
        return losses

    def _loss_weights(self) -> dict[str, float]:
        return {
            "codebook": self.codebook_weight,
            "commitment": self.commitment_weight,
            "entropy": self.entropy_weight,
            "orthogonality": self.orthogonality_weight,
            "codebook_variance": self.variance_weight,
            "codebook_covariance": self.covariance_weight,
            "codebook_variance_hinge": self.variance_hinge_weight,
            "repulsion": self.repulsion_weight,
            "contrastive": self.contrastive_weight,
        }

    # ---- codebook dynamics (training mode only) ----------------------------------------------------------------
    @torch.no_grad()
    def _maintain_codebook(self, flat: Tensor) -> int:
        """Before the search: k-means initialisation (once) and due dead-code restarts. Returns codes restarted."""
        if self.kmeans_init and not bool(self.initted):
            self._kmeans_step(flat)
        if self.restarter is not None and self.restarter.due():
            plan = self.restarter.plan(self.codebook_vectors())
            if plan is not None:
                self._apply_restart(plan)
                self.restarter.commit(plan)
                return int(plan.dead.numel())
        return 0

    def _kmeans_step(self, flat: Tensor) -> None:
        """Pool this batch's latents; once enough are pooled (rank 0 decides), run k-means there and broadcast.
        With a features source, compute the features and cluster them at once instead."""
        if self.features_source is not None:
            self._features_step(flat.device)
            return
        self._kmeans_pool.append(flat.detach().float())
        self._kmeans_pool_batches += 1
        pooled = sum(x.shape[0] for x in self._kmeans_pool)
        ready = torch.tensor(
            float(self._kmeans_pool_batches >= self.kmeans_batches and pooled >= self.codebook_size),
            device=flat.device,
        )
        broadcast_(ready)  # every rank follows rank 0, which holds the samples
        if not bool(ready):
            return
        centroids = torch.zeros(self.codebook_size, self.raw_dim, device=flat.device)  # (K, raw_dim)
        counts = torch.zeros(self.codebook_size, device=flat.device)  # (K,)
        if is_main_process():
            samples = torch.cat(self._kmeans_pool)  # (S, D)
            if self.kmeans_max_samples is not None and samples.shape[0] > self.kmeans_max_samples:
                keep = max(self.kmeans_max_samples, self.codebook_size)
                samples = samples[torch.randperm(samples.shape[0], device=samples.device)[:keep]]
            result = kmeans(
                samples,
                self.codebook_size,
                iters=self.kmeans_iters,
                seeding=self.kmeans_seeding,
                max_chunk_bytes=self.max_chunk_bytes,
            )
            centroids.copy_(result.centroids)
            counts.copy_(result.counts * (pooled / samples.shape[0]) / self._kmeans_pool_batches)  # per step
        broadcast_(centroids)
        broadcast_(counts)
        self.codebook.data.copy_(centroids.to(self.codebook.dtype))
        if self.codebook_update == "ema":
            counts = counts.clamp_min(1.0)  # at least the one pseudo-count of a fresh codebook, so M / N = centroid
            self.ema_cluster_size.copy_(counts)
            self.ema_embed_sum.copy_(centroids * counts[:, None])
            flush_subnormals_(self.ema_cluster_size)
            flush_subnormals_(self.ema_embed_sum)
        self.initted.fill_(True)
        self._kmeans_pool = []
        self._kmeans_pool_batches = 0

    def _features_step(self, device: torch.device) -> None:
        """VQGAN-LC init: features of the source's encoder and images on rank 0, clustered, broadcast, written once."""
        centroids = torch.zeros(self.codebook_size, self.raw_dim, device=device)  # (K, C)
        if is_main_process():
            source = self.features_source
            features = source_features(source, device)  # (N, C) on the CPU
            centroids.copy_(
                feature_codebook(
                    features,
                    self.codebook_size,
                    iters=self.kmeans_iters,
                    seeding=self.kmeans_seeding,
                    max_samples=self.kmeans_max_samples,
                    seed=source["seed"],
                    max_chunk_bytes=self.max_chunk_bytes,
                )
            )
        broadcast_(centroids)
        self.codebook.data.copy_(centroids.to(self.codebook.dtype))
        if self.codebook_update == "ema":
            self.ema_cluster_size.fill_(1.0)  # one pseudo-count each, so M / N = the feature codebook
            self.ema_embed_sum.copy_(centroids)
        self.initted.fill_(True)

    def _apply_restart(self, plan: RestartPlan) -> None:
        """Write reseeded codes (identical on every rank) into the codebook and, with EMA, its statistics."""
        self.codebook.data[plan.dead] = plan.vectors.to(self.codebook.dtype)
        if self.codebook_update != "ema":
            return
        size, emb = self.ema_cluster_size, self.ema_embed_sum
        if plan.sources is not None:  # "split": the two halves share the popular code's statistics
            for src, dst in zip(plan.sources.tolist(), plan.dead.tolist()):
                size[src] = size[src] / 2
                emb[src] = emb[src] / 2
                size[dst] = size[src]
        else:
            size[plan.dead] = size.mean()
        emb[plan.dead] = plan.vectors * size[plan.dead, None]

    @torch.no_grad()
    def _track_codebook(self, flat: Tensor, indices: Tensor) -> None:
        """After the forward pass: EMA codebook update and usage statistics for restarts (both all-reduced)."""
        if self.codebook_update != "ema" and self.restarter is None:
            return
        counts, sums = batch_cluster_statistics(flat, indices, self.codebook_size)  # (K,), (K, D), all ranks
        if self.codebook_update == "ema":
            ema_codebook_update_(
                self.codebook,
                self.ema_cluster_size,
                self.ema_embed_sum,
                counts,
                sums,
                decay=self.ema_decay,
                epsilon=self.ema_epsilon,
                laplace_smoothing=self.ema_laplace_smoothing,
            )
        if self.restarter is not None:
            self.restarter.observe(flat, counts)

    # ---- inference -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        flat, grid = self._prepare(z)
        return nearest_codes(flat, self.codebook_vectors(), self.max_chunk_bytes).reshape(grid)

    def decode(self, indices: Tensor) -> Tensor:
        check_indices(indices, self.codebook_size)
        codes = self.codebook_vectors()
        flat = codes.index_select(0, indices.reshape(-1).long())  # (N, D)
        grid = tuple(indices.shape)
        return restore_layout(flat, grid)

    @torch.no_grad()
    def export(self) -> VectorQuantizer:
        """A plain quantizer holding the mapped codebook ``f(C)``: same indices and outputs in eval mode, no projector,
        no training-only state (EMA statistics, restart buffers, estimator and auxiliary objectives)."""
        mapped = self.codebook if self.projector is None else self.projector(self.codebook)
        plain = VectorQuantizer(
            self.codebook_size,
            self.codebook_dim,
            commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight,
            distance=self.distance,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        plain.codebook.data.copy_(mapped.detach())
        return plain.to(self.codebook.device).train(self.training)

    def extra_repr(self) -> str:
        extra = f", estimator={self.estimator!r}" if self.estimator != "ste" else ""
        if self.codebook_update == "ema":
            extra += f", codebook_update='ema', ema_decay={self.ema_decay}"
        if self.freeze_codebook:
            extra += ", freeze_codebook=True"
        if self.raw_dim != self.codebook_dim:
            extra += f", raw_dim={self.raw_dim}"
        return f"{super().extra_repr()}, distance={self.distance!r}, commitment_weight={self.commitment_weight}{extra}"


def _check_options(
    *,
    projector: nn.Module | None,
    estimator: str,
    temperature: float,
    temperature_final: float | None,
    codebook_update: str,
    ema_decay: float,
    ema_epsilon: float,
    kmeans_init: bool,
    kmeans_iters: int,
    kmeans_batches: int,
    kmeans_max_samples: int | None,
    kmeans_seeding: str,
    restart_strategy: str | None,
    weights: dict[str, float],
    features_source: dict | None = None,
    freeze_codebook: bool = False,
    raw_dim: int | None = None,
    codebook_dim: int | None = None,
    temperatures: dict[str, float] | None = None,
) -> None:
    """Refuse unknown names, out-of-range values and combinations that cannot work together."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if temperature <= 0 or (temperature_final is not None and temperature_final <= 0):
        raise ValueError(
            f"temperatures must be > 0, got temperature={temperature}, temperature_final={temperature_final}"
        )
    if codebook_update not in CODEBOOK_UPDATES:
        raise ValueError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {codebook_update!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    if ema_epsilon <= 0:
        raise ValueError(f"ema_epsilon must be > 0, got {ema_epsilon}")
    if kmeans_seeding not in SEEDINGS:
        raise ValueError(f"kmeans_seeding must be one of {SEEDINGS}, got {kmeans_seeding!r}")
    if kmeans_iters < 0 or kmeans_batches < 1:
        raise ValueError(f"kmeans_iters must be >= 0 and kmeans_batches >= 1, got {kmeans_iters} and {kmeans_batches}")
    if kmeans_max_samples is not None and kmeans_max_samples < 1:
        raise ValueError(f"kmeans_max_samples must be >= 1 or None, got {kmeans_max_samples}")
    for name, value in weights.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (temperatures or {}).items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if features_source is not None and not kmeans_init:
        raise ValueError(
            "kmeans_source is a features source but kmeans_init is False: set kmeans_init=True to initialise the "
            "codebook from the features (or drop kmeans_source)"
        )
    if raw_dim is not None and raw_dim != codebook_dim and projector is None:
        raise ValueError(
            f"the features of kmeans_source have {raw_dim} channels but codebook_dim is {codebook_dim}: add a "
            f"projector mapping {raw_dim} -> {codebook_dim} (VQGAN-LC: projector {{type: linear}}, whose input_dim "
            "the config builder fills in), or pick a feature layer with codebook_dim channels"
        )
    if freeze_codebook:
        movers = [
            name
            for name, on in (
                ("codebook_update='ema'", codebook_update == "ema"),
                (f"restart_strategy={restart_strategy!r}", restart_strategy is not None),
            )
            if on
        ]
        if movers:
            raise ValueError(
                f"freeze_codebook=True cannot be combined with {', '.join(movers)}: those exist to move code vectors, "
                "a frozen codebook never moves after its initialisation; drop one of them"
            )
        if projector is None:
            trainers = [n for n in ("orthogonality_weight", "variance_weight", "covariance_weight") if weights[n] > 0]
            trainers += [n for n in ("variance_hinge_weight", "repulsion_weight") if weights.get(n, 0) > 0]
            if estimator == "ibq":
                trainers.append("estimator='ibq'")
            if trainers:
                raise ValueError(
                    f"{', '.join(trainers)} train the codebook by gradient, but freeze_codebook=True without a "
                    "projector leaves nothing to train; add a projector (SimVQ: linear) or drop them"
                )
    if projector is not None:
        writers = [
            name
            for name, on in (
                ("codebook_update='ema'", codebook_update == "ema"),
                ("kmeans_init=True", kmeans_init and features_source is None),
                (f"restart_strategy={restart_strategy!r}", restart_strategy is not None),
            )
            if on
        ]
        if writers:
            raise ValueError(
                f"{', '.join(writers)} cannot be combined with a projector: these write code vectors into the raw "
                f"codebook C, but with a projector the search uses f(C) ({type(projector).__name__}); use "
                "projector=None, or train the projected codebook by gradient without them"
            )
    if codebook_update == "ema":
        if estimator == "ibq":
            raise ValueError(
                "estimator='ibq' needs a codebook trained by gradient (its point is to send gradient to every code), "
                "but codebook_update='ema' makes the codebook a buffer; use codebook_update='gradient'"
            )
        geometry = [n for n in ("orthogonality_weight", "variance_weight", "covariance_weight") if weights[n] > 0]
        geometry += [n for n in ("variance_hinge_weight", "repulsion_weight") if weights.get(n, 0) > 0]
        if geometry:
            raise ValueError(
                f"{', '.join(geometry)} > 0 shape the codebook by gradient, but codebook_update='ema' makes it a "
                "buffer without gradient; set them to 0 or use codebook_update='gradient'"
            )


def batch_code_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage and perplexity of one batch of indices, as detached scalars (batch-local, not a set-level figure)."""
    with torch.no_grad():
        usage, perplexity = usage_and_perplexity(code_counts(indices, codebook_size))
        return {"usage": usage.float(), "perplexity": perplexity.float()}
