"""bgad_core: pure PyTorch anomaly detection on frozen backbone features, by detector family, no Ray or MLflow.

``backbone`` extracts multi-scale features once; ``data`` reads dataset layouts, splits them and synthesises RACP
anomalies; ``models`` holds the family contract, the registry and one folder per family (BGAD, PatchCore,
SimpleNet); ``evaluation`` the metrics and their intervals; ``engine`` trains any family, selects its epoch on
validation, checkpoints, scores images (``Scorer``) and exports to ONNX; ``train`` is one run from the command line.

    >>> from bgad_core.models.registry import family_names
    >>> family_names()
    ('bgad', 'patchcore', 'simplenet')
"""

__all__ = ["backbone", "data", "engine", "evaluation", "models", "precision", "train"]
