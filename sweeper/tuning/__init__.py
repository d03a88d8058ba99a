"""The sweep itself: one Ray Tune experiment over every category (Optuna or grid search, ASHA and a plateau rule; a
study and a scheduler per category), its trainable (one detector of any family, trained from the feature cache),
the final choice among trials, the console progress lines, the copy that keeps an interrupted experiment resumable,
and the store that lets trials reuse a single-pass family's fit.

Usage (not run here: it starts Ray and needs a built cache), as ``sweeper/run.py`` calls it::

    summary = sweeper.tuning.sweep.run_sweep(config, cache_uri, sweeper.cache.reader.open_cache(cache_uri), tracking_uri)
"""

__all__ = ["categories", "experiment_state", "fit_store", "progress", "selection", "sweep", "trainable"]
