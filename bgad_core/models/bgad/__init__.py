"""BGAD and BGAD-FAS: conditional normalizing flows with an explicit boundary, few-shot.

Yao et al., "Explicit Boundary Guided Semi-Push-Pull Contrastive Learning for Supervised Anomaly Detection"
(CVPR 2023; BGAD-FAS in its journal extension). One conditional flow per backbone level models the density of
normal feature vectors, conditioned on each cell's 2-D position. Phase 1 fits the flows to normals by maximum
likelihood; phase 2 adds the boundary-guided semi-push-pull loss (BG-SPP): an explicit boundary is set at the
``beta`` percentile of normal log-likelihoods, normals are pulled above it, and the few labelled anomalies (real,
plus RandAugmented CutPaste samples of them) are pushed below a margin ``tau`` under it, so that the model learns
what its defects look like without fitting a decision boundary to them. BGAD-FAS weighs both sides with
asymmetric focal weights. Without anomalies the same training is plain one-class BGAD.

Here the flows train on cached backbone features (no backbone in the loop), their likelihoods are scored with
constants fixed on training normals (a score does not depend on the batch), and the scoring choices
(calibration, coarse-level weight, image-score reduction, how much each cell's distance to the nearest normal
patch counts beside the likelihoods, in the map and in the image score, and how large the bank of normal patches
is) are made on validation at no training cost (``scoring_choice``). Parts:
``config`` (what a sweep varies, by concern), ``torch_model`` (the flows, a plain ``nn.Module``), ``training`` (the
two phases), ``scoring`` and ``scoring_choice``, ``detector`` (what is served).

    >>> import torch
    >>> from bgad_core.data.features import FeatureSet
    >>> from bgad_core.models.bgad import FAMILY
    >>> def rows(n, labels):
    ...     return FeatureSet([torch.randn(n, 8, 8, 8), torch.randn(n, 16, 4, 4)],
    ...                       [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)], torch.tensor(labels),
    ...                       [str(i) for i in range(n)])
    >>> config = FAMILY.config(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=1)
    >>> training = FAMILY.training(config, rows(6, [0] * 6), (8, 16), "cpu")
    >>> _ = training.train_meta_epoch()
    >>> evaluation = training.validate(rows(4, [0, 0, 1, 1]), (32, 32), "image_auroc")
    >>> evaluation.maps.shape
    torch.Size([4, 32, 32])
    >>> sorted(evaluation.choices)  # doctest: +NORMALIZE_WHITESPACE
    ['calibration_position', 'coarse_level_weight', 'image_score_nearest_normal_weight', 'image_score_top1pct_mean',
     'image_score_unsmoothed_max', 'nearest_normal_coreset_ratio', 'nearest_normal_weight']
"""

from bgad_core.models.base import FEW_SHOT, Family
from bgad_core.models.bgad.config import BGADConfig, FlowArchitecture, Optimisation, ScoringChoices
from bgad_core.models.bgad.detector import BGADDetector
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.training import BGADTraining, bgad_training

FAMILY = Family(
    name="bgad",
    learning_type=FEW_SHOT,
    config=BGADConfig,
    detector=BGADDetector,
    training=bgad_training,
    summary="BGAD / BGAD-FAS: conditional flows, explicit boundary, the labelled anomalies pushed below it",
)

__all__ = ["FAMILY", "BGADConfig", "BGADDetector", "BGADFlows", "BGADTraining", "FlowArchitecture",
           "Optimisation", "ScoringChoices", "bgad_training"]
