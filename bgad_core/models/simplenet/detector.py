"""A trained SimpleNet as the engine checkpoints, serves and exports it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bgad_core.models.base import Detector
from bgad_core.models.components.postprocess import gaussian_blur, upsample
from bgad_core.models.components.cells import patch_embeddings
from bgad_core.models.simplenet.config import SimpleNetConfig
from bgad_core.models.simplenet.torch_model import STANDARDISATION_BUFFERS, SimpleNet


class SimpleNetDetector(Detector):
    """Patch embeddings -> adaptor -> discriminator -> anomaly map; the image score is the map's maximum.

    The maximum is the paper's image score: a defect anywhere makes the image anomalous, and the blur before it
    keeps a single noisy patch from deciding alone. The module traces to ONNX as it is (``exportable`` is the
    base's ``self``): linear layers, an eval-mode BatchNorm, the bilinear upsampling and the blur.

    Args:
        config: the family config it was trained with (kept for the checkpoint; ``blur_sigma`` applies here).
        levels: indices, among the backbone's levels, of ``config.feature_strides`` (mapped by the training).
        model: the trained adaptor and discriminator (shared, not copied: a training that goes on changes it).
        image_size: ``(H, W)`` of the maps.
    """

    family = "simplenet"

    def __init__(self, config: SimpleNetConfig, levels: Sequence[int], model: SimpleNet,
                 image_size: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.levels = tuple(int(level) for level in levels)
        self.model = model
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def train(self, mode: bool = True) -> SimpleNetDetector:
        """Ignore ``mode``: a detector only scores, so its BatchNorm keeps the running statistics (as the frozen
        backbone's ``FeatureExtractor.train`` does). Otherwise a wrapper's ``train()`` would switch it to batch
        statistics and make scores depend on the batch: ``torch.onnx.export`` does exactly that when it restores
        the mode of a module built around the detector (``ExportableScorer``), before the export's agreement check
        scores with PyTorch. The training switches the shared model back to training mode itself."""
        return super().train(False)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every level's ``(B, C_l, H_l, W_l)`` features (any float dtype; embedded in float32) -> float32 scores
        ``(B,)`` and maps ``(B, H, W)``."""
        maps = gaussian_blur(upsample(self.model(patch_embeddings(features, self.levels)), self.image_size),
                             self.config.blur_sigma)
        return maps.flatten(1).amax(dim=1), maps

    def to_checkpoint(self) -> dict[str, Any]:
        """Config, levels, the embedding width and the weights (on the CPU, so that any machine loads them)."""
        return {"config": self.config.to_dict(), "levels": list(self.levels),
                "channels": int(self.model.adaptor.in_features),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, entry: Mapping[str, Any], image_size: tuple[int, int]) -> SimpleNetDetector:
        """The detector ``to_checkpoint`` described, in eval mode. A checkpoint from before the features were
        standardised has no standardisation buffers: it keeps the identity it was trained with."""
        config = SimpleNetConfig.from_dict(entry["config"])
        model = untrained_model(config, int(entry["channels"]))
        identity = {k: v for k, v in model.state_dict().items() if k in STANDARDISATION_BUFFERS}
        model.load_state_dict({**identity, **entry["model"]})
        return cls(config, entry["levels"], model, image_size).eval()


def untrained_model(config: SimpleNetConfig, channels: int, generator: torch.Generator | None = None) -> SimpleNet:
    """A freshly initialised ``SimpleNet`` with the config's widths, for embeddings ``channels`` wide."""
    return SimpleNet(channels, config.adaptor_dim, config.discriminator_hidden, generator)
