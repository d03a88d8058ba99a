"""PatchCore: Towards Total Recall in Industrial Anomaly Detection.

PatchCore (Roth et al., CVPR 2022) describes what normal looks like by a memory bank of patch features from a
frozen pretrained backbone: mid-level features, each averaged over its 3x3 neighbourhood, coarser levels upsampled
to the finest chosen one. A greedy k-center coreset keeps a small share of the patches that still covers all of
them. A test patch's anomaly score is its distance to the nearest bank entry; the image score is the largest
one, re-weighted by how isolated that entry is among its neighbours in the bank (the paper's Eq. 7).

This implementation works on the cached backbone features the BGAD family trains on (``FeatureSet``), reads the
levels named by ``PatchCoreConfig.feature_strides`` (8 and 16 by default), draws the coreset on a 128-dim random
projection, and makes anomaly maps as BGAD does (bilinear upsampling to the image, Gaussian blur). Nearest
neighbours are exact (one matrix product and ``topk``, which the ONNX tracer follows); there is no approximate
index (FAISS) and no backbone of its own: feature extraction belongs to the engine.

It is here as the one-class family a sweep can pick when labels do not help: it never reads an anomaly, so it
needs no labelled defects, trains in one pass with nothing to tune on validation, and its gap to the best
few-shot trial is what the labels bought.

Example:
    >>> import torch
    >>> from bgad_core.data.features import FeatureSet
    >>> from bgad_core.models.patchcore import PatchCoreConfig, PatchCoreTraining
    >>> def rows(labels):
    ...     n = len(labels)
    ...     return FeatureSet([torch.randn(n, 8, 8, 8), torch.randn(n, 16, 4, 4)],
    ...                       [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)], torch.tensor(labels),
    ...                       [str(i) for i in range(n)])
    >>> training = PatchCoreTraining(PatchCoreConfig(coreset_ratio=0.1), rows([0, 0, 0, 1]), [8, 16], "cpu")
    >>> log = training.train_meta_epoch()
    >>> evaluation = training.validate(rows([0, 1, 0, 1]), (32, 32), "image_auroc")
    >>> evaluation.scores.shape, evaluation.maps.shape, training.memory_bank.shape
    (torch.Size([4]), torch.Size([4, 32, 32]), torch.Size([19, 24]))
    >>> sorted(evaluation.metrics)
    ['image_aupr', 'image_auroc', 'image_f1_max']

Notes:
    The family is ``single_pass``: one meta-epoch whatever the sweep's schedule, so there is nothing to prune or
    stop early. ``torch_model.PatchCore`` is the bare module; the sweep's baseline and the benchmarks still call
    its ``fit``/``predict`` directly.

See Also:
    ``bgad_core.models.base`` for the contract; Roth et al., arXiv:2106.08265; anomalib's ``Patchcore``.
"""

from bgad_core.models.base import ONE_CLASS, Family
from bgad_core.models.patchcore.config import PatchCoreConfig
from bgad_core.models.patchcore.detector import PatchCoreDetector
from bgad_core.models.patchcore.torch_model import PatchCore
from bgad_core.models.patchcore.training import PatchCoreTraining

__all__ = ["FAMILY", "PatchCore", "PatchCoreConfig", "PatchCoreDetector", "PatchCoreTraining"]

FAMILY = Family(
    name="patchcore",
    learning_type=ONE_CLASS,
    config=PatchCoreConfig,
    detector=PatchCoreDetector,
    training=PatchCoreTraining,
    summary="PatchCore (one-class): memory bank of normal patch features, nearest-neighbour distance; no labels",
    single_pass=True,
)
