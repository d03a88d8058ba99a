"""Training the SimpleNet family on cached features: synthetic anomalies from noise, and real ones where labelled.

The patch embeddings of the rows it trains on are computed once (the backbone is frozen, so they never change);
each sub-epoch is one shuffled pass over the normal patches in steps of ``batch_size``, every normal patch giving
one synthetic anomaly (its adapted feature plus Gaussian noise). In few-shot mode each step also draws as many real
anomalous patches as it has normal ones (or all of them, where there are fewer), with replacement.

Which cells of an anomalous row are anomalous comes from its mask at the map's level (``fiber_labels``, shared with BGAD):
cells whose defect share reaches ``abnormal_fraction`` are anomalous, partly defect cells are left out, defect-free
cells are normal. An anomalous row whose mask covers the whole image carries an image-level label (so does one
whose mask marks nothing: its label still says it is not normal); its cells are candidates, and at the start of
every sub-epoch the ``push_fraction`` of each such image's cells that the current model finds most anomalous
become that pass's anomalies (multiple-instance learning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError, TrainingDivergedError
from bgad_core.models.base import Evaluation, OptimizerTraining, ScoreDistribution, split_metrics
from bgad_core.models.components.cells import fiber_labels, patch_embeddings
from bgad_core.models.components.levels import level_indices
from bgad_core.models.simplenet.config import SimpleNetConfig
from bgad_core.models.simplenet.detector import SimpleNetDetector, untrained_model

ADAPTOR_LR_RATIO = 0.5  # the paper's adaptor / discriminator learning rates, 1e-4 / 2e-4
EMBED_ROWS = 64  # images embedded at a time: bounds the float32 intermediates of the 3x3 averaging and upsampling


class SimpleNetTraining(OptimizerTraining):
    """SimpleNet on a training ``FeatureSet``, meta-epoch by meta-epoch.

    One-class where ``config.use_anomalies`` is false or the set has no anomalous row: only the normal rows are
    read. Otherwise few-shot: the anomalous rows' defect cells train as real anomalies (see the module docstring).

    Args:
        config: the family config.
        train: training features of every backbone level, with each level's mask fractions.
        strides: the stride of each of ``train``'s levels, in order; ``config.feature_strides`` picks among them.
        device: where the model trains and validation scores ("cpu", "cuda", ...).
    """

    def __init__(self, config: SimpleNetConfig, train: FeatureSet, strides: Sequence[int], device: str) -> None:
        levels = level_indices("simplenet", config.feature_strides, strides)
        if not bool((train.labels == 0).any()):
            raise ConfigError("simplenet: the training set has no normal image")
        self.config = config
        self.levels = levels
        self.device = torch.device(device)
        # one-class: the anomalous rows are never read
        used = train if config.use_anomalies else train.select(torch.nonzero(train.labels == 0).flatten())
        self.vectors = torch.cat([_patches(used.features, self.levels, start, self.device)
                                  for start in range(0, len(used), EMBED_ROWS)])  # (rows x cells, C)
        shares = used.masks[self.levels[0]].flatten(1).float()  # defect share of each cell at the map's level
        labels = fiber_labels(shares, config.abnormal_fraction)
        image_level = (used.labels == 1) & ((shares >= 1).all(dim=1) | (shares == 0).all(dim=1))
        cells = torch.arange(labels.numel()).reshape(labels.shape)
        pixel_level = ~image_level
        self.normal_cells = cells[pixel_level][labels[pixel_level] == 0].to(self.device)
        self.abnormal_cells = cells[pixel_level][labels[pixel_level] == 1].to(self.device)
        self.candidate_cells = cells[image_level].to(self.device)  # (image-level rows, cells)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = untrained_model(config, int(self.vectors.shape[1]), self.generator).to(self.device)
        self.model.standardise(self.vectors[self.normal_cells])
        self.optimizer = torch.optim.Adam([
            {"params": self.model.adaptor.parameters(), "lr": config.lr * ADAPTOR_LR_RATIO},
            {"params": self.model.discriminator.parameters(), "lr": config.lr},
        ])
        self.epoch = 0

    @property
    def few_shot(self) -> bool:
        """Whether real anomalous cells train (phase 2 in the log); false: one-class."""
        return bool(len(self.abnormal_cells) or len(self.candidate_cells))

    def train_meta_epoch(self) -> dict[str, float]:
        """``sub_epochs`` passes; the mean step loss and the phase: 2.0 where real anomalies trained, else 1.0."""
        cfg = self.config
        losses = []
        for sub in range(cfg.sub_epochs):
            abnormal = self._abnormal_cells()
            self.model.train()
            order = torch.randperm(len(self.normal_cells), generator=self.generator)
            for chunk in order.split(cfg.batch_size):
                noise = torch.randn(len(chunk), self.model.width, generator=self.generator) * cfg.noise_std
                real = None
                if len(abnormal):
                    draw = torch.randint(len(abnormal), (min(len(chunk), len(abnormal)),), generator=self.generator)
                    real = self.vectors[abnormal[draw.to(self.device)]]
                loss = self.model.loss(self.vectors[self.normal_cells[chunk.to(self.device)]], noise.to(self.device),
                                       real, cfg.normal_margin, cfg.anomaly_margin)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"simplenet: non-finite loss {loss.item()} at meta-epoch {self.epoch}, "
                                                f"sub-epoch {sub}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.detach())
        self.epoch += 1
        return {"loss": float(torch.stack(losses).mean()), "phase": 2.0 if self.few_shot else 1.0}

    @torch.no_grad()
    def _abnormal_cells(self) -> torch.Tensor:
        """This pass's real anomalous cells: every pixel-labelled one, and of each image-level row the
        ``push_fraction`` of its cells the current model (in eval mode) scores as most anomalous."""
        if not len(self.candidate_cells):
            return self.abnormal_cells
        self.model.eval()
        normality = self._normality(self.candidate_cells.flatten()).reshape(self.candidate_cells.shape)
        chosen = most_anomalous_cells(self.candidate_cells, normality, self.config.push_fraction)
        return torch.cat([self.abnormal_cells, chosen])

    def _normality(self, cells: torch.Tensor) -> torch.Tensor:
        """Discriminator outputs of the given cells, ``batch_size`` at a time (bounds the hidden activations)."""
        return torch.cat([self.model.normality(self.vectors[part]) for part in cells.split(self.config.batch_size)])

    def validate(self, val: FeatureSet, image_size: tuple[int, int], objective: str) -> Evaluation:
        """Score ``val`` with the current model; nothing is left to choose, so ``objective`` is not read. The image
        score is the map's maximum, the paper's (``SimpleNetDetector``)."""
        detector = SimpleNetDetector(self.config, self.levels, self.model, image_size)
        scores, maps = detector.predict(val)
        return Evaluation(split_metrics(val, scores, maps), scores, maps, detector, {})

    @torch.no_grad()
    def score_distribution(self, max_vectors: int = 20000) -> ScoreDistribution:
        """Discriminator outputs of (a sample of) normal training cells and of what the loss trains as anomalous
        (their synthetic copies, and the real anomalous cells of the current pass in few-shot mode), with the two
        margins the loss aims at. Sampled with a generator of its own, so that the training stream is untouched."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed)
        sample = self.normal_cells[torch.randperm(len(self.normal_cells), generator=generator)[:max_vectors]
                                   .to(self.device)]
        adapted = self.model.adapt(self.vectors[sample])
        noise = torch.randn(adapted.shape, generator=generator).to(self.device) * self.config.noise_std
        normal = self.model.discriminator(adapted)[:, 0]
        abnormal = [self.model.discriminator(adapted + noise)[:, 0], self._normality(self._abnormal_cells())]
        return ScoreDistribution(normal.cpu().numpy(), torch.cat(abnormal).cpu().numpy(),
                                 {"normal_margin": self.config.normal_margin,
                                  "anomaly_margin": -self.config.anomaly_margin},
                                 "discriminator output (normality)")


def most_anomalous_cells(cells: torch.Tensor, normality: torch.Tensor, fraction: float) -> torch.Tensor:
    """Of each row of ``cells`` (one image-level anomalous image's cells), the ``fraction`` (at least one) with
    the lowest ``normality``, flattened.

    An image-level label says that some cells of the image are anomalous, not which: training all of them as
    anomalies would fight the normal cells that look the same (multiple-instance learning). BGAD's
    ``least_likely_abnormal`` makes the same choice among a step's vectors; here it is made per image, so that
    every labelled image contributes its share.
    """
    count = max(1, math.ceil(fraction * cells.shape[1]))
    return cells.gather(1, normality.topk(count, dim=1, largest=False).indices).flatten()


def _patches(features: Sequence[torch.Tensor], levels: Sequence[int], start: int,
             device: torch.device) -> torch.Tensor:
    """Patch embeddings ``(rows x cells, C)`` of the ``EMBED_ROWS`` rows from ``start``, row-major by cell."""
    embedding = patch_embeddings([f[start : start + EMBED_ROWS].to(device) for f in features], levels)
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
