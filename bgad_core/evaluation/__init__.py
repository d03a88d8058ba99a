"""How good a detector is: image and pixel metrics (AUROC, AUPR, F1-max, PRO), their 95 % bootstrap intervals, and
the rows of seen and unseen defect types.

    >>> from bgad_core.evaluation.metrics import compute_metrics
    >>> compute_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["image_auroc"]
    1.0
"""

__all__ = ["defect_groups", "intervals", "metrics"]
