"""What one sweep job is, before any Ray work: its validated config, the lock that keeps it to one process, the
stop requests that end it resumably, how credentials reach it, and the safe names that reach MLflow filters.

    >>> from sweeper.job.names import is_safe_name, match
    >>> is_safe_name("quickstart"), is_safe_name("bob's-sweep")
    (True, False)
    >>> match({"bgad.role": "sweep"}, name="bgad-tiles")
    "tags.`bgad.role` = 'sweep' and name = 'bgad-tiles'"

Usage (not run here: a config names datasets on disk): ``config = sweeper.job.config.load_config("sweep.yaml")``.
"""

__all__ = ["config", "credentials", "interrupt", "lock", "names"]
