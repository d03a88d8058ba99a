"""What a sweep may fix or search for the SimpleNet family."""

from __future__ import annotations

from dataclasses import dataclass

from bgad_core.errors import ConfigError
from bgad_core.models.base import DetectorConfig


@dataclass
class SimpleNetConfig(DetectorConfig):
    """Settings of the SimpleNet family (one-class, or few-shot where the training set has labelled anomalies).

    Attributes:
        feature_strides: backbone level strides it reads (each must be one the backbone extracts); the first is the
            anomaly map's resolution, coarser ones are 3x3-averaged and upsampled to it, as PatchCore's.
        adaptor_dim: output width of the feature adaptor (one linear layer); None or 0 (default): the embedding's
            own width, the paper's square adaptor.
        discriminator_hidden: width of the discriminator's hidden layer (paper: 1024).
        noise_std: standard deviation of the Gaussian noise that turns adapted normal features into synthetic
            anomalies. The embeddings are standardised per channel on the training normals first
            (``SimpleNet.standardise``), so it is a fraction of a channel's spread whatever the backbone's scale.
            The default, 0.3, is the smallest probed value at which the discriminator learns quickly on real
            data (0.1 learns slowly: DeepPCB loss 0.59 after 4 x 4 passes, against 0.015 after 4 x 4 at 0.3);
            at the paper's 0.015 the one-class loss stays at 1.0000 (a patch and its noisy copy score alike) on
            MTD-200, DeepPCB and BrainMRI, and validation rose on all three at 0.3 (BENCHMARKS.md, "SimpleNet's
            noise scale"); sweeps search it.
        lr: Adam learning rate of the discriminator; the adaptor trains at half of it, the paper's ratio
            (1e-4 / 2e-4). The default is the paper's 2e-4, as the default schedule is of the same order as the
            paper's: 8 x 4 passes in steps of 4096 patches make ~1600 steps on 200 images of 256 px read at
            stride 8, the paper's 40 x 4 epochs in batches of 8 images ~5000 steps of ~10k patches.
        meta_epochs: outer epochs; validation runs after each one.
        sub_epochs: passes over the (shuffled) normal training patches per meta-epoch (paper: 4 per epoch).
        batch_size: normal patches per optimisation step (each also gives one synthetic anomaly).
        normal_margin: the discriminator is trained to score normal patches at least this high (truncated L1
            loss; paper: 0.5).
        anomaly_margin: the discriminator is trained to score anomalous patches (synthetic, and real ones in
            few-shot mode) at most minus this (paper: 0.5).
        use_anomalies: few-shot mode where the training set has anomalous rows (labelled anomalies and their
            RACP samples): their defect cells are trained as anomalies beside the synthetic ones and their
            defect-free cells as normals; false: one-class, anomalous rows are never read.
        abnormal_fraction: share of defect pixels from which a feature cell counts as anomalous (as BGAD's); cells
            with less (but some) defect are left out of the loss rather than trained as normal.
        push_fraction: for anomalous rows with image-level labels (a mask covering the whole image, or none), the
            share of each image's cells trained as anomalies, those the discriminator currently finds most
            anomalous (multiple-instance learning: most cells of a defective image look normal); rows with pixel
            masks train every defect cell. The default, 0.1, assumes a defect covers at most a tenth of an image.
        blur_sigma: Gaussian smoothing of anomaly maps, in pixels (paper: 4; 0: none).
        seed: seeds initialisation, shuffling and the noise.
    """

    feature_strides: tuple[int, ...] = (8, 16)
    adaptor_dim: int | None = None
    discriminator_hidden: int = 1024
    noise_std: float = 0.3
    lr: float = 2e-4
    meta_epochs: int = 8
    sub_epochs: int = 4
    batch_size: int = 4096
    normal_margin: float = 0.5
    anomaly_margin: float = 0.5
    use_anomalies: bool = True
    abnormal_fraction: float = 0.25
    push_fraction: float = 0.1
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        self.feature_strides = tuple(int(stride) for stride in self.feature_strides)  # lists, from YAML or JSON
        if not self.feature_strides or len(set(self.feature_strides)) != len(self.feature_strides) \
                or min(self.feature_strides) < 1:
            raise ConfigError(f"simplenet feature_strides: expected distinct positive strides, "
                              f"got {list(self.feature_strides)}")
        if self.adaptor_dim is not None and not _is_count(self.adaptor_dim, 0):
            raise ConfigError(f"simplenet adaptor_dim must be None, 0 (the embedding's width) or a width >= 1, "
                              f"got {self.adaptor_dim}")
        for key in ("discriminator_hidden", "meta_epochs", "sub_epochs", "batch_size"):
            if not _is_count(getattr(self, key), 1):
                raise ConfigError(f"simplenet {key} must be an integer >= 1, got {getattr(self, key)}")
        for key in ("noise_std", "lr", "normal_margin", "anomaly_margin"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"simplenet {key} must be > 0, got {getattr(self, key)}")
        for key in ("abnormal_fraction", "push_fraction"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"simplenet {key} must lie in (0, 1], got {getattr(self, key)}")
        if not self.blur_sigma >= 0:
            raise ConfigError(f"simplenet blur_sigma must be >= 0 (0: no blur), got {self.blur_sigma}")


def _is_count(value: object, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool, which Python counts as one) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
