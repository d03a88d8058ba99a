"""What works for every family through the contract of ``bgad_core.models.base``: epoch selection on validation
(``selection``), plateau stopping (``stopping``), checkpoints (``checkpoint``), scoring raw images (``inference``)
and the ONNX export (``export``).

    >>> from bgad_core.engine.stopping import PlateauConfig, PlateauRule
    >>> rule = PlateauRule(PlateauConfig(patience=2, min_delta=0.01), first_epoch=1)
    >>> [rule.update(epoch, value) for epoch, value in enumerate([0.5, 0.6, 0.605, 0.604], start=1)]
    [False, False, False, True]
"""

__all__ = ["checkpoint", "export", "inference", "selection", "stopping"]
