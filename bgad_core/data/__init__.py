"""Images in, features out: dataset layouts (MVTec AD, BTAD, folders), few-shot splits, RandAugmented CutPaste
anomalies (``racp``), generated defect images (``synthetic``), untrusted image input, and the ``FeatureSet`` every
family trains and evaluates on.

    >>> import tempfile
    >>> from bgad_core.data.datasets import read_category
    >>> from bgad_core.data.synthetic import make_synthetic_category
    >>> index = read_category(make_synthetic_category(tempfile.mkdtemp(), size=32, n_train=4, n_test_good=2,
    ...                                               n_test_per_defect=2))
    >>> index.has_masks
    True
"""

__all__ = ["datasets", "features", "image_input", "racp", "splits", "synthetic"]
