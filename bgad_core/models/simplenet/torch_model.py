"""SimpleNet as a plain ``nn.Module``: feature adaptor, discriminator, and the truncated L1 loss that trains them.

The paper's two trained parts, on patch embeddings from a frozen backbone: a feature adaptor (one linear layer)
that maps the pretrained features to a space fitted to the target data, and a discriminator (a two-layer MLP)
whose output is a normality score, trained to put adapted normal patches above ``normal_margin`` and anomalous
ones below ``-anomaly_margin``. The anomalous ones are adapted normal patches plus Gaussian noise, and in
few-shot mode also real defect patches. The family around it (``bgad_core.models.simplenet``) adds the config, the
training loop and the checkpointed detector.

One addition to the paper: the patch embeddings are standardised per channel (the training normals' mean and
standard deviation, fixed before training and kept as buffers, so that checkpoints, serving and ONNX export apply
them too). The noise that makes the synthetic anomalies has a fixed standard deviation, so without it its effect
depends on the backbone's feature scale: lite0's per-channel standard deviation is about 3.3 (BrainMRI, DeepPCB),
where the paper's 0.015 is 0.5 % of it and the discriminator cannot tell a patch from its noisy copy (one-class
loss stuck at 1.0000 from the second meta-epoch on DeepPCB, test image AUROC 0.544). Standardised, the noise is a
share of each channel's spread for any backbone (``SimpleNetConfig.noise_std`` says which share).

Example:
    >>> import torch
    >>> model = SimpleNet(channels=24, discriminator_hidden=32, generator=torch.Generator().manual_seed(0))
    >>> normal = torch.randn(64, 24)
    >>> loss = model.loss(normal, 0.1 * torch.randn(64, 24), None, normal_margin=0.5, anomaly_margin=0.5)
    >>> loss.backward()
    >>> model.eval()(torch.randn(2, 24, 8, 8)).shape
    torch.Size([2, 8, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2  # the discriminator's LeakyReLU, as the paper's
SCALE_FLOOR = 1e-3  # least per-channel scale of the standardisation, as a fraction of the mean channel's
STANDARDISATION_BUFFERS = ("feature_mean", "feature_scale")  # absent from checkpoints of before the standardisation


class SimpleNet(nn.Module):
    """Adaptor + discriminator; anomaly score of a patch = minus the discriminator's output.

    Args:
        channels: width of the patch embeddings it reads.
        adaptor_dim: output width of the adaptor; None or 0: ``channels`` (the paper's square adaptor).
        discriminator_hidden: width of the discriminator's hidden layer (paper: 1024).
        generator: draws the initial weights (None: the global generator), so that a seed fixes them.
    """

    def __init__(self, channels: int, adaptor_dim: int | None = None, discriminator_hidden: int = 1024,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        width = adaptor_dim or channels
        self.adaptor = nn.Linear(channels, width)
        self.discriminator = nn.Sequential(
            nn.Linear(width, discriminator_hidden),
            nn.BatchNorm1d(discriminator_hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(discriminator_hidden, 1, bias=False),
        )
        # Xavier-normal weights, as the official code; zero biases, so that the generator alone fixes the start
        for layer in (self.adaptor, self.discriminator[0], self.discriminator[3]):
            nn.init.xavier_normal_(layer.weight, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        mean, scale = STANDARDISATION_BUFFERS
        self.register_buffer(mean, torch.zeros(channels))  # the identity until ``standardise``
        self.register_buffer(scale, torch.ones(channels))

    @torch.no_grad()
    def standardise(self, normal: torch.Tensor) -> None:
        """Fix the per-channel standardisation to ``normal`` ``(N, C)`` patch embeddings' mean and standard
        deviation (a channel that barely varies keeps a scale of at least ``SCALE_FLOOR`` of the mean one, so that
        it cannot blow up on new images)."""
        scale, mean = torch.std_mean(normal, dim=0)
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale.clamp_min(SCALE_FLOOR * float(scale.mean())))

    @property
    def width(self) -> int:
        """Width of the adapted features (what the synthetic noise is added to)."""
        return int(self.adaptor.out_features)

    def normality(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` patch embeddings -> ``(N,)`` discriminator outputs (higher: more normal)."""
        return self.discriminator(self.adapt(patches))[:, 0]

    def adapt(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` patch embeddings -> ``(N, width)`` adapted features (standardised, then the adaptor)."""
        return self.adaptor((patches - self.feature_mean) / self.feature_scale)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` embeddings -> ``(B, H, W)`` anomaly scores, minus the normality (the paper's s = -D).

        In eval mode (BatchNorm on its running statistics) every patch scores alone: no batch dependence.
        """
        patches = embedding.permute(0, 2, 3, 1)
        return -self.normality(patches.flatten(0, 2)).reshape(-1, *patches.shape[1:3])

    def loss(self, normal: torch.Tensor, noise: torch.Tensor, abnormal: torch.Tensor | None,
             normal_margin: float, anomaly_margin: float) -> torch.Tensor:
        """The truncated L1 loss of one step (the paper's, with real anomalies as a third term).

        ``normal``: ``(N, C)`` normal patch embeddings; ``noise``: ``(N, width)`` Gaussian noise added to their
        adapted features to make the synthetic anomalies; ``abnormal``: ``(M, C)`` real anomalous patch embeddings
        or None. Each kind is one mean: ``max(0, normal_margin - D(normal))``, ``max(0, anomaly_margin +
        D(normal + noise))`` and, with real anomalies, ``max(0, anomaly_margin + D(abnormal))``, so that a few real
        anomalous patches weigh as much as the many synthetic ones. All go through the discriminator in one batch,
        as in the official code (BatchNorm's training statistics are those of the mix).
        """
        adapted = self.adapt(normal)
        parts = [adapted, adapted + noise] + ([] if abnormal is None else [self.adapt(abnormal)])
        normality = self.discriminator(torch.cat(parts))[:, 0]
        count = normal.shape[0]
        loss = F.relu(normal_margin - normality[:count]).mean()
        loss = loss + F.relu(anomaly_margin + normality[count : 2 * count]).mean()
        if abnormal is not None:
            loss = loss + F.relu(anomaly_margin + normality[2 * count :]).mean()
        return loss
