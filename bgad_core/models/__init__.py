"""Detector families behind one contract (``base``), found by name in the ``registry``; parts they share live in
``components``. Each family is a folder: ``bgad`` (BGAD / BGAD-FAS, few-shot), ``patchcore`` (one-class),
``simplenet`` (SimpleNet, one-class or few-shot).

    >>> from bgad_core.models.registry import family
    >>> family("bgad").learning_type, family("patchcore").single_pass
    ('few_shot', True)
"""

__all__ = ["base", "bgad", "components", "patchcore", "registry", "simplenet"]
