"""SimpleNet: A Simple Network for Image Anomaly Detection and Localization, with a few-shot mode.

SimpleNet (Liu et al., CVPR 2023) trains two small networks on the locally aggregated patch features of a frozen
pretrained backbone: a feature adaptor (one linear layer) that moves the generic features towards the target
domain, and a discriminator (a two-layer MLP) that tells normal patches from anomalous ones. It never sees a real
anomaly: the anomalous patches are adapted normal features plus Gaussian noise, and a truncated L1 loss puts normal
patches above a margin and noisy ones below minus a margin. At test time a patch's anomaly score is minus the
discriminator's output; the anomaly map is upsampled to the image and Gaussian-smoothed, and its maximum is the
image score.

This implementation trains on the cached backbone features every family here shares (``FeatureSet``): it embeds
the levels named by ``SimpleNetConfig.feature_strides`` as PatchCore does (3x3 averaging, coarser levels upsampled
to the finest chosen one and concatenated, rather than the paper's per-level projection to a fixed width), shuffles
the patches of all normal images into steps of ``batch_size``, trains adaptor and discriminator with Adam at the
paper's 1:2 learning rates (no learning-rate schedule, no weight decay), and scores batch-independently (BatchNorm
on its running statistics). It has no backbone of its own: feature extraction belongs to the engine.

Few-shot mode, in the spirit of SuperSimpleNet (Rolih et al., ICPR 2024, which extends SimpleNet to use labelled
anomalies): where the training set has anomalous rows (the few labelled anomalies and their RACP samples) and
``use_anomalies`` is on, their defect cells (from each row's mask at the map's level, as BGAD's) are a third term
of the same truncated L1 loss, pushed below the anomaly margin beside the synthetic ones, and their defect-free
cells train as normal. Rows labelled only per image (a mask covering the whole image) contribute, each pass, the
``push_fraction`` of their cells the current model finds most anomalous. SuperSimpleNet's own changes (a
segmentation head, Perlin-noise masks for the synthetic anomalies, a classification head) are not made here: the
few-shot mode is SimpleNet's loss with real anomalies added, nothing else.

It is here as a third family with a different inductive bias from the others: a discriminative boundary learned
from synthetic (and optionally real) anomalies, against BGAD's density with an explicit boundary and PatchCore's
nearest-neighbour distance. It trains in seconds to minutes on a CPU and exports to one small ONNX graph. The
paper's figures came from keeping the best epoch on the test set; here, as for every family, the epoch is
selected on validation and test is scored once.

Example:
    >>> import torch
    >>> from bgad_core.data.features import FeatureSet
    >>> from bgad_core.models.simplenet import FAMILY
    >>> def rows(labels):
    ...     n = len(labels)
    ...     masks = torch.tensor(labels, dtype=torch.float32).view(n, 1, 1)  # anomalous rows: whole-image labels
    ...     return FeatureSet([torch.randn(n, 8, 8, 8), torch.randn(n, 16, 4, 4)],
    ...                       [masks.expand(n, 8, 8), masks.expand(n, 4, 4)], torch.tensor(labels),
    ...                       [str(i) for i in range(n)])
    >>> config = FAMILY.config(discriminator_hidden=32, batch_size=64, sub_epochs=1, noise_std=0.1)
    >>> training = FAMILY.training(config, rows([0, 0, 0, 0, 1]), [8, 16], "cpu")
    >>> log = training.train_meta_epoch()
    >>> log["phase"]  # the anomalous row trained: few-shot
    2.0
    >>> evaluation = training.validate(rows([0, 1, 0, 1]), (32, 32), "image_auroc")
    >>> evaluation.scores.shape, evaluation.maps.shape, evaluation.choices
    (torch.Size([4]), torch.Size([4, 32, 32]), {})

See Also:
    ``bgad_core.models.base`` for the contract; Liu et al., arXiv:2303.15140; Rolih et al., arXiv:2408.03143
    (SuperSimpleNet); the official code, github.com/DonaldRR/SimpleNet; anomalib's ``Supersimplenet``.
"""

from bgad_core.models.base import FEW_SHOT, Family
from bgad_core.models.simplenet.config import SimpleNetConfig
from bgad_core.models.simplenet.detector import SimpleNetDetector
from bgad_core.models.simplenet.torch_model import SimpleNet
from bgad_core.models.simplenet.training import SimpleNetTraining

__all__ = ["FAMILY", "SimpleNet", "SimpleNetConfig", "SimpleNetDetector", "SimpleNetTraining"]

FAMILY = Family(
    name="simplenet",
    learning_type=FEW_SHOT,
    config=SimpleNetConfig,
    detector=SimpleNetDetector,
    training=SimpleNetTraining,
    summary="SimpleNet: adaptor + discriminator against noise-made anomalies; labelled defects as extra anomalies "
            "(few-shot; one-class with use_anomalies false)",
)
