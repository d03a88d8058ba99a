"""The registered model and its serving: ``serving`` is the MLflow pyfunc a promoted version holds (logged as
code, with ``bgad_core``), ``scoring_app`` the HTTP app ``python -m sweeper.serve`` runs around the same scorer.
The commands that promote, serve and export versions stay at the top: ``sweeper.promote``, ``sweeper.serve``,
``sweeper.export``.

    >>> import numpy as np
    >>> from sweeper.registry.serving import decode_image, encode_image
    >>> decode_image(encode_image(np.zeros((40, 48, 3), dtype=np.uint8)), "row 0").shape
    (40, 48, 3)
"""

__all__ = ["scoring_app", "serving"]
