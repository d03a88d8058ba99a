"""Score raw images with a trained model: backbone + the checkpoint's detector, of any family.

Training never sees images, only cached backbone features (fp16 by default). A served model must reproduce what
the trial's own evaluation computed from those features, so ``Scorer`` runs the same frozen backbone in fp32,
*rounds its features to the dtype training stored them in* and then applies the detector (``bgad_core.models``:
BGAD's flows and fixed scoring constants, PatchCore's memory bank, ...): served scores equal the trial's
evaluation scores, and the F1-max threshold chosen on validation applies to them unchanged.

Rounding to fp16 reproduces the cached features because ``FeatureExtractor.extract`` gives an image the same
fp32 features in any batch and on any number of threads (see there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from bgad_core.backbone import FeatureExtractor
from bgad_core.engine.checkpoint import detector_from_checkpoint, load_checkpoint
from bgad_core.errors import ConfigError, DataError

SCORE_BATCH = 16  # images per backbone call in ``Scorer.score``
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# What both feature producers store unless told otherwise: ``extract_feature_set`` (bgad_core.train) and the
# sweep's feature cache (``cache.dtype``) default to fp16.
DEFAULT_FEATURE_DTYPE = "float16"


class Prediction(NamedTuple):
    """Per image: anomaly score, anomaly map (see ``map_size``), decision ``score >= threshold``."""

    scores: np.ndarray  # (N,) float32
    maps: list[np.ndarray]  # N arrays map_size(H_i, W_i) float32
    decisions: np.ndarray  # (N,) bool


class Scorer(nn.Module):
    """A servable model: frozen backbone, the checkpoint's detector and its decision threshold.

    Args:
        checkpoint: a ``bgad_core.engine.checkpoint`` dict (as ``load_checkpoint`` returns it) whose ``backbone``
            names the backbone (``name``, ``strides``, ``weights_digest``, optionally ``feature_dtype``).
        extractor: the backbone with the weights the detector was trained on (checked against the digest).
    """

    def __init__(self, checkpoint: Mapping[str, Any], extractor: FeatureExtractor) -> None:
        super().__init__()
        backbone = checkpoint["backbone"]
        if extractor.weights_digest != backbone["weights_digest"]:
            raise ConfigError(
                f"backbone weights: digest {extractor.weights_digest} ({extractor.weights_source}) differs from "
                f"the {backbone['weights_digest']} the detector was trained on"
            )
        trained = backbone.get("channels")
        if trained is not None and list(extractor.channels) != list(trained):
            raise ConfigError(f"backbone channels {list(extractor.channels)} differ from the {list(trained)} the "
                              "detector was trained on")
        self.extractor = extractor
        self.detector = detector_from_checkpoint(checkpoint)
        self.family = str(checkpoint["family"])
        self.image_size = tuple(int(s) for s in checkpoint["image_size"])
        self.threshold = float(checkpoint["threshold"])
        self.feature_dtype = feature_dtype(checkpoint)
        self.eval()

    @classmethod
    def load(cls, checkpoint_path: str | Path, backbone_weights: str | Path) -> Scorer:
        """Rebuild from a checkpoint file and the backbone's own state dict file (both read ``weights_only``)."""
        checkpoint = load_checkpoint(checkpoint_path)
        backbone = checkpoint["backbone"]
        for key in ("name", "strides", "weights_digest"):
            if key not in backbone:
                raise ConfigError(f"{checkpoint_path}: checkpoint backbone lacks {key!r} (cannot rebuild the backbone)")
        extractor = FeatureExtractor(backbone["name"], weights=str(backbone_weights), strides=backbone["strides"])
        return cls(checkpoint, extractor)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, H, W, 3]`` images at ``image_size`` -> image scores ``(B,)`` and maps ``(B, H, W)``.

        Features pass through the training storage dtype before the detector (which computes in fp32), so they are
        exactly what training and validation saw.
        """
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            height, width = self.image_size
            raise DataError(f"images: expected [B, {height}, {width}, 3], got {list(images.shape)}")
        return self.score_features(self.extractor.extract(images))

    def score_features(self, features: Sequence[torch.Tensor], detector: nn.Module | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (fp32) -> image scores ``(B,)`` and maps ``(B, H, W)``: all of the model after the backbone.

        ``detector``: the detector's ``exportable`` form, when the caller traces it (``bgad_core.engine.export``).
        """
        return (detector or self.detector)([f.to(self.feature_dtype) for f in features])

    def score(self, images: Iterable[np.ndarray]) -> Prediction:
        """Score uint8 images of any size (``[H, W, 3]`` RGB or ``[H, W]`` grey; any iterable of them).

        Each image is resized to the model's ``image_size`` exactly as the training data were (``load_image``:
        PIL bilinear) as soon as it arrives, so a generator that decodes one image at a time keeps one image at
        full resolution in memory, never the whole batch. The score comes from the map at model resolution, as in
        evaluation; the map is returned at ``map_size``. Batches run through the backbone together, which changes
        no image's result (see ``FeatureExtractor.extract``).
        """
        inputs, sizes = [], []
        for index, image in enumerate(images):
            rgb = as_rgb(image, f"image {index}")
            inputs.append(resize(rgb, self.image_size))
            sizes.append(map_size(rgb.shape[:2], self.image_size))
        scores, maps = [], []
        for start in range(0, len(inputs), SCORE_BATCH):
            chunk_scores, chunk_maps = self(torch.from_numpy(np.stack(inputs[start : start + SCORE_BATCH])))
            scores += chunk_scores.cpu().tolist()
            maps += [resize_map(m.cpu(), size).numpy() for m, size in zip(chunk_maps, sizes[start:])]
        values = np.asarray(scores, dtype=np.float32)
        return Prediction(values, maps, values >= self.threshold)


def map_size(image_size: tuple[int, int], model_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image's anomaly map: the image's own, but no side longer than the model's input.

    The map is computed at the model's input size; resizing it up to a large image adds no information, only
    bytes (a 2000 x 2000 image made an 82 MB JSON reply). A caller overlaying the map on its image resizes it.
    """
    return min(image_size[0], model_size[0]), min(image_size[1], model_size[1])


def feature_dtype(checkpoint: Mapping[str, Any]) -> torch.dtype:
    """The dtype the flows' training features were stored in (``backbone.feature_dtype``, default fp16)."""
    name = checkpoint["backbone"].get("feature_dtype", DEFAULT_FEATURE_DTYPE)
    if name not in FEATURE_DTYPES:
        raise ConfigError(f"backbone.feature_dtype: expected one of {sorted(FEATURE_DTYPES)}, got {name!r}")
    return FEATURE_DTYPES[name]


def save_backbone_weights(extractor: FeatureExtractor, path: str | Path) -> Path:
    """Write the backbone's state dict as safetensors: loading it runs no code and needs no network or package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in extractor.model.state_dict().items()}, str(path))
    return path


def as_rgb(image: Any, name: str) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array from ``[H, W, 3]`` or grey ``[H, W]`` / ``[H, W, 1]`` uint8 input."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DataError(f"{name}: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise DataError(f"{name}: expected an [H, W, 3] RGB or [H, W] grey image, got shape {list(array.shape)}")
    return np.ascontiguousarray(array)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` uint8 resized to ``size`` (height, width) as ``datasets.load_image`` does (PIL bilinear)."""
    if image.shape[:2] == tuple(size):
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def resize_map(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An ``(h, w)`` anomaly map resized bilinearly to ``size`` (unchanged when it already has that size)."""
    if tuple(heatmap.shape) == tuple(size):
        return heatmap
    return F.interpolate(heatmap[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
