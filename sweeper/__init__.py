"""Orchestration over ``bgad_core``: sweeps of detector families and datasets on Ray, tracked in MLflow.

Subsystems, each a package that imports none of its modules (import the module you need):

- ``job``: what one sweep job is: its config, the one-run lock, stop requests, credentials, safe names;
- ``cache``: the feature cache: planned on the driver, built once with Ray Data, read by every trial;
- ``tuning``: the Ray Tune + Optuna sweep, its trainable, progress lines and resumable state;
- ``tracking``: MLflow runs of sweeps and trials, and the figures trials log;
- ``registry``: the registered model (an MLflow pyfunc) and the HTTP app that serves it.

The commands stay at the top: ``python sweeper/run.py`` (a sweep), ``python -m sweeper.promote``,
``python -m sweeper.serve`` and ``python -m sweeper.export``.
"""

__all__ = ["cache", "job", "registry", "tracking", "tuning", "export", "promote", "run", "serve"]
