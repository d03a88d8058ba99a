"""Two-phase BGAD / BGAD-FAS training of the flows on precomputed features (no backbone in the loop).

Phase 1 (the first ``normal_epochs`` meta-epochs) fits the flows to normal feature vectors only, so that the
normal log-likelihood distribution, and with it the explicit boundary, is meaningful. Phase 2 samples images
normal:abnormal = 2:1 (balanced sampling) and adds the BG-SPP loss around the boundary, with the asymmetric
focal weights of BGAD-FAS when enabled. A training set without anomalies trains plain BGAD throughout: maximum
likelihood on normals, no BG-SPP and no focal weights, whatever ``focal_weighting`` says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from bgad_core.data.features import FeatureSet
from bgad_core.engine.stopping import first_watched_epoch
from bgad_core.errors import TrainingDivergedError
from bgad_core.models.base import Evaluation, OptimizerTraining, ScoreDistribution
from bgad_core.models.bgad.boundary import find_boundary
from bgad_core.models.bgad.coarse_labels import coarse_rows, distant_threshold, narrow_coarse_labels
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.detector import BGADDetector
from bgad_core.models.bgad.losses import bg_spp_loss, focal_weights, ml_loss
from bgad_core.models.bgad.scoring import Normalization
from bgad_core.models.bgad.scoring_choice import (CORESET_RATIOS, EpochScoring, ScoredSplit, choose_bank,
                                                  choose_scoring, scoring_candidates)
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.components.cells import IGNORED, fiber_labels
from bgad_core.models.components.memory_bank import NearestNormal, fit_banks
from bgad_core.precision import resolve_precision

log = logging.getLogger(__name__)


def least_likely_abnormal(logps: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep-mask: every normal vector and the ``fraction`` of abnormal vectors with the lowest log-likelihood.

    An image-level label (no pixel mask) marks every cell of the image abnormal although most of them look
    normal; pushing all of them below the boundary fights the pull on the same-looking normal cells. Treating the
    label as "some cells are abnormal" (multiple-instance learning), only the least likely ones are pushed.
    """
    abnormal = labels == 1
    count = int(abnormal.sum())
    keep = ~abnormal
    if count:
        k = max(1, math.ceil(fraction * count))
        chosen = torch.nonzero(abnormal).flatten()[logps.detach()[abnormal].topk(k, largest=False).indices]
        keep[chosen] = True
    return keep


def bank_shares(config: BGADConfig) -> tuple[float, ...]:
    """The memory bank's candidate shares of the training normals' patches: ``CORESET_RATIOS`` where the config says
    "auto", the configured share otherwise. Where no map weighs the distances in (``nearest_normal_weight`` 0), only
    coarse labels read a bank, the smallest share's, and only it is filled."""
    ratio = config.nearest_normal_coreset_ratio
    if ratio != "auto":
        return (float(ratio),)
    return CORESET_RATIOS if config.nearest_normal_weight != 0 else CORESET_RATIOS[:1]


class _LevelData:
    """One level's training vectors (the flow's inputs, ``BGADFlows.aggregate``d) flattened to ``(N*H*W, C)`` with
    their labels and position indices."""

    def __init__(self, feature: torch.Tensor, labels: torch.Tensor, model: BGADFlows, device: torch.device):
        n, c, h, w = feature.shape
        self.cells = h * w
        self.grid = (h, w)
        self.vectors = model.aggregate(feature.to(device)).permute(0, 2, 3, 1).reshape(-1, c)
        self.labels = labels.reshape(-1).to(device)

    def fibers_of(self, images: torch.Tensor) -> torch.Tensor:
        """Indices of all usable cells of the given images (repeats allowed)."""
        index = (images.to(self.labels.device).unsqueeze(1) * self.cells + torch.arange(self.cells, device=self.labels.device)).reshape(-1)
        return index[self.labels[index] != IGNORED]


class BGADTraining(OptimizerTraining):
    """Trains ``BGADFlows`` on a training ``FeatureSet`` (normal rows and real or synthetic anomalous rows)."""

    def __init__(
        self, model: BGADFlows, config: BGADConfig, train: FeatureSet, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.precision = resolve_precision(config.precision, self.device)  # auto: bf16 only on bf16 hardware
        self.train_set = train
        self.normal_rows = torch.nonzero(train.labels == 0).flatten()
        self.abnormal_rows = torch.nonzero(train.labels == 1).flatten()
        if len(self.normal_rows) == 0:
            raise ValueError("the training set has no normal image")
        self.coreset_ratios = bank_shares(config)
        self._banks: list[NearestNormal] | None = None  # one per candidate share (``memory_banks``)
        self._chosen_bank: int | None = None  # which of them validation chose (``choose_bank``)
        self._distances: tuple[FeatureSet, torch.Tensor] | None = None
        self._scoring = EpochScoring()  # remembers the flows' best validation figure, which distances alone must beat
        self.levels = [_LevelData(f, labels, self.model, self.device)
                       for f, labels in zip(train.features, self._cell_labels())]
        # Focal weighting is BGAD-FAS's, meaningful only beside anomalies: without any, phase 2 is plain BGAD's
        # maximum-likelihood training (the loss does not jump at the phase switch).
        self.focal = config.focal_weighting and len(self.abnormal_rows) > 0
        self.generator = torch.Generator().manual_seed(config.seed)
        # fused: the whole update of all ~200 parameter tensors in one kernel, not several foreach passes per step
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          fused=self.device.type in ("cpu", "cuda"))
        self.epoch = 0

    def _cell_labels(self) -> list[torch.Tensor]:
        """Every level's cell labels (``fiber_labels``), coarse labels narrowed where ``coarse_labels`` says
        "distant" (``coarse_labels``; the memory bank is filled only where some row has a coarse label). Labels are
        set before any validation, so by the bank of the smallest candidate share."""
        labels = [fiber_labels(mask, self.config.abnormal_fraction) for mask in self.train_set.masks]
        rows = coarse_rows(labels[0])
        if self.config.coarse_labels == "all" or not rows.any():
            return labels
        bank = self.memory_banks[0]
        threshold = distant_threshold(bank.calibration_distances)
        distances = bank.predict(self.train_set.select(torch.nonzero(rows).flatten()), self.device)
        narrowed = narrow_coarse_labels(labels, rows, distances, threshold, self.config.abnormal_fraction)
        log.info("coarse labels of %d training rows narrowed to their distant cells: %d of %d labelled cells kept "
                 "(nearest-normal distance above %.2f)", int(rows.sum()), int((narrowed[0][rows] == 1).sum()),
                 int((labels[0][rows] == 1).sum()), threshold)
        return narrowed

    def learning_rate(self, sub_epoch: int) -> float:
        """Linear warm-up over ``warmup_epochs`` meta-epochs, then cosine decay to 1e-3 of ``lr``."""
        cfg = self.config
        total = cfg.meta_epochs * cfg.sub_epochs
        warm = cfg.warmup_epochs * cfg.sub_epochs
        if sub_epoch < warm:
            return cfg.lr * (0.01 + 0.99 * sub_epoch / warm)
        progress = (sub_epoch - warm) / max(1, total - warm)
        floor = cfg.lr * 1e-3
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))

    def _sample_images(self, with_anomalies: bool) -> torch.Tensor:
        """All normal images once, plus (phase 2) ``abnormal_ratio`` as many anomalous ones drawn with replacement."""
        rows = [self.normal_rows]
        if with_anomalies and len(self.abnormal_rows):
            count = max(1, round(len(self.normal_rows) * self.config.abnormal_ratio))
            draw = torch.randint(len(self.abnormal_rows), (count,), generator=self.generator)
            rows.append(self.abnormal_rows[draw])
        return torch.cat(rows)

    def _step_loss(self, level: int, fibers: torch.Tensor, cells: torch.Tensor | None, phase2: bool) -> torch.Tensor:
        """The loss of one step over the vectors ``fibers``; ``cells``: the cells of a position block, if it is one."""
        cfg = self.config
        data = self.levels[level]
        labels = data.labels[fibers]
        vectors = data.vectors[fibers]
        if cells is None:
            logps = self.model.cell_logps(level, vectors, fibers % data.cells, data.grid, self.precision)
        else:  # a block holds every cell of its images, partly-defect ones too: they leave the loss here
            logps = self.model.block_logps(level, vectors, cells, data.grid, self.precision)
            usable = labels != IGNORED
            logps, labels = logps[usable], labels[usable]
        if phase2 and cfg.push_fraction < 1.0:
            keep = least_likely_abnormal(logps, labels, cfg.push_fraction)
            logps, labels = logps[keep], labels[keep]
        normal = labels == 0
        weights = focal_weights(logps, labels, cfg.normalizer) if (phase2 and self.focal) else None
        loss = ml_loss(logps[normal], None if weights is None else weights[normal])
        if phase2 and cfg.bgspp_lambda > 0 and bool((labels == 1).any()) and bool(normal.any()):
            boundary = find_boundary(logps, labels, cfg.beta, cfg.tau, cfg.normalizer)
            loss = loss + cfg.bgspp_lambda * bg_spp_loss(logps, labels, boundary, cfg.normalizer, weights)
        return loss

    def _steps(self, level: int, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One sub-epoch's steps over a level: ``(fibers, cells)``, ``cells`` None for shuffled steps."""
        cfg = self.config
        data = self.levels[level]
        device = data.labels.device
        if not cfg.cells_per_step:
            fibers = data.fibers_of(images)
            fibers = fibers[torch.randperm(len(fibers), generator=self.generator).to(device)]
            for chunk in fibers.split(cfg.fiber_batch):
                yield chunk, None
            return
        # k cells x fiber_batch // k images; with fewer images than that, more cells, so steps keep their size
        images_per_step = min(len(images), max(1, cfg.fiber_batch // min(cfg.cells_per_step, data.cells)))
        cells_per_step = min(data.cells, max(1, cfg.fiber_batch // images_per_step))
        images = images[torch.randperm(len(images), generator=self.generator)].to(device)
        cells = torch.randperm(data.cells, generator=self.generator).to(device)
        image_groups, cell_groups = images.split(images_per_step), cells.split(cells_per_step)
        for block in torch.randperm(len(image_groups) * len(cell_groups), generator=self.generator).tolist():
            group, step_cells = image_groups[block // len(cell_groups)], cell_groups[block % len(cell_groups)]
            yield (group.unsqueeze(1) * data.cells + step_cells).reshape(-1), step_cells

    def train_meta_epoch(self) -> dict[str, float]:
        """Run ``sub_epochs`` passes and return the mean loss and final learning rate of this meta-epoch."""
        cfg = self.config
        phase2 = self.epoch >= cfg.normal_epochs
        self.model.train()
        losses = []
        for sub in range(cfg.sub_epochs):
            lr = self.learning_rate(self.epoch * cfg.sub_epochs + sub)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = self._sample_images(phase2)
            for level in range(len(self.levels)):
                for fibers, cells in self._steps(level, images):
                    loss = self._step_loss(level, fibers, cells, phase2)
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"non-finite loss {loss.item()} at meta-epoch {self.epoch}, sub-epoch {sub}, level {level}"
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    losses.append(loss.detach())
        self.epoch += 1
        return {"loss": float(torch.stack(losses).mean()), "lr": lr, "phase": 2.0 if phase2 else 1.0}

    @torch.no_grad()
    def score_distribution(self, max_vectors: int = 20000) -> ScoreDistribution:
        """Normalised per-dim log-likelihoods of (a sample of) normal and abnormal training vectors, with b_n, b_a.

        What the BG-SPP loss sees, for a histogram: all levels pooled, anomalous images included.
        """
        self.model.eval()
        cfg = self.config
        images = torch.cat([self.normal_rows, self.abnormal_rows])
        logps, labels = [], []
        for level, data in enumerate(self.levels):
            fibers = data.fibers_of(images)
            fibers = fibers[torch.randperm(len(fibers), generator=torch.Generator().manual_seed(level))[:max_vectors]]
            logps.append(self.model.cell_logps(level, data.vectors[fibers], fibers % data.cells, data.grid).cpu())
            labels.append(data.labels[fibers].cpu())
        all_logps, all_labels = torch.cat(logps), torch.cat(labels)
        boundary = find_boundary(all_logps, all_labels, cfg.beta, cfg.tau, cfg.normalizer)
        scaled = (all_logps / cfg.normalizer).numpy()
        return ScoreDistribution(scaled[all_labels.numpy() == 0], scaled[all_labels.numpy() == 1],
                                 {"b_n": float(boundary.normal), "b_a": float(boundary.abnormal)},
                                 "per-dim log-likelihood / normalizer")

    def fit_normalizations(self, calibrations: Sequence[str], max_images: int | None = None) -> list[Normalization]:
        """Scoring constants of each calibration, from (up to ``max_images``, evenly spaced for determinism) training
        normals whose flows run once for all of them.

        By default 512 images where a per-position calibration is among them (it needs a sample per cell), 64
        otherwise. The coarse-level weight and image-score reduction are the defaults; ``validate`` sets them.
        """
        if max_images is None:
            max_images = 512 if "position" in calibrations else 64
        rows = self.normal_rows
        if len(rows) > max_images:
            rows = rows[torch.linspace(0, len(rows) - 1, max_images).long()]
        maps = logp_maps(self.model, self.train_set.select(rows), self.device)
        return [Normalization.fit(maps, calibration) for calibration in calibrations]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's resumable state and the flows' best validation figure so far (``EpochScoring``)."""
        return {**super().state_dict(), "scoring": self._scoring.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()`` (one saved before the scoring's state was kept resumes without it)."""
        super().load_state_dict(state)
        if "scoring" in state:
            self._scoring.load_state_dict(state["scoring"])

    @property
    def first_selectable_epoch(self) -> int:
        """After phase 1: the phase-1 model is plain normal-only BGAD, and a short schedule must not hand back the
        model that BG-SPP never touched (at the last meta-epoch at the latest)."""
        return first_watched_epoch(self.config.normal_epochs, self.config.meta_epochs)

    @property
    def memory_banks(self) -> list[NearestNormal]:
        """A memory bank of training-normal patches per candidate share, the smallest first, filled at first use
        from one greedy run (``fit_banks``; the features never change, so once per training; about a PatchCore
        fit's time at the largest share)."""
        if self._banks is None:
            normals = self.train_set.select(self.normal_rows)
            self._banks = fit_banks([f.to(self.device) for f in normals.features], self.coreset_ratios,
                                    self.config.seed)
        return self._banks

    @property
    def nearest_normal(self) -> NearestNormal:
        """The memory bank validation chose (``choose_bank``); before any validation, the smallest share's."""
        return self.memory_banks[self._chosen_bank or 0]

    def choose_bank(self, val: FeatureSet, image_size: tuple[int, int], objective: str) -> NearestNormal:
        """The memory bank whose distances alone score ``val`` best on ``objective`` (``scoring_choice.choose_bank``:
        the larger share only where it scores more than the margin higher, and, under a pixel objective, keeps
        image AUROC), chosen at the first call, kept for the rest of the training; a single candidate is taken."""
        if self._chosen_bank is None:
            banks = self.memory_banks
            distances = [bank.predict(val, self.device) for bank in banks]
            self._chosen_bank = (choose_bank(distances, val, image_size, self.config.blur_sigma, objective)
                                 if len(banks) > 1 else 0)
            self._distances = (val, distances[self._chosen_bank])
            if len(banks) > 1:
                log.info("memory bank: %g %% of the training normals' patches, chosen on validation %s among %s",
                         100 * self.coreset_ratios[self._chosen_bank], objective,
                         ", ".join(f"{100 * r:g} %" for r in self.coreset_ratios))
        return self.nearest_normal

    def nearest_distances(self, split: FeatureSet) -> torch.Tensor:
        """``split``'s standardised nearest-normal distances (``NearestNormal``), on the CPU. The last split's are
        kept: validation asks for the same split's every meta-epoch, and they never change."""
        if self._distances is None or self._distances[0] is not split:
            self._distances = (split, self.nearest_normal.predict(split, self.device))
        return self._distances[1]

    def validate(self, val: FeatureSet, image_size: tuple[int, int], objective: str) -> Evaluation:
        """Evaluate the current flows on validation with scoring constants fitted now (``fit_normalizations``).

        Every scoring choice the config leaves "auto" (calibration, coarse-level weight, image-score reduction,
        nearest-normal weight, the image score's map) is made here on ``objective`` by ``scoring_choice.choose_scoring``; the returned
        evaluation's detector holds the choices. The flows run once over the normals and once over validation,
        whatever the number of candidates; the nearest-normal distances once per training.
        """
        cfg = self.config
        calibrations, weights, reductions, nearest = scoring_candidates(
            cfg.calibration, cfg.coarse_level_weight, cfg.image_score, cfg.nearest_normal_weight)
        fits = self.fit_normalizations(calibrations)
        logps = logp_maps(self.model, val, self.device)
        distances = None
        if max(nearest) > 0:
            self.choose_bank(val, image_size, objective)
            distances = self.nearest_distances(val)
        return self.evaluation(choose_scoring(logps, val, fits, weights, reductions, image_size, cfg.blur_sigma,
                                              objective, nearest, distances, self._scoring,
                                              self.epoch >= self.first_selectable_epoch,
                                              cfg.image_score_map == "auto"), image_size)

    def evaluation(self, scored: ScoredSplit, image_size: tuple[int, int]) -> Evaluation:
        """The contract's ``Evaluation`` of a scoring of the current flows."""
        nearest = self.nearest_normal if scored.normalization.uses_distances else None
        detector = BGADDetector(self.model, scored.normalization, self.config.blur_sigma, image_size, self.config,
                                nearest)
        choices = scored.normalization.choice_metrics()
        if self._chosen_bank is not None:  # validation chose a bank, whether or not this scoring uses it
            choices["nearest_normal_coreset_ratio"] = self.coreset_ratios[self._chosen_bank]
        return Evaluation(scored.metrics, scored.scores, scored.maps, detector, choices)


def bgad_training(config: BGADConfig, train: FeatureSet, strides: Sequence[int], device: str = "cpu") -> BGADTraining:
    """The family's ``Training``: flows for every level of ``train`` (``strides`` name the levels; all are used)."""
    return BGADTraining(BGADFlows.from_config([f.shape[1] for f in train.features], config), config, train, device)


@torch.no_grad()
def logp_maps(
    model: BGADFlows, features: FeatureSet, device: torch.device | str = "cpu", batch_size: int = 32
) -> list[torch.Tensor]:
    """Per-level per-dim log-likelihood maps ``(N, H_l, W_l)`` of every row, returned on the CPU."""
    model.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in features.features]
    for start in range(0, len(features), batch_size):
        batch = [f[start : start + batch_size].to(device) for f in features.features]
        for store, logps in zip(parts, model(batch)):
            store.append(logps.cpu())
    return [torch.cat(p) for p in parts]
