"""MLflow bookkeeping: one parent run per sweep and one child run per trial, found again by tags on resume
(``mlflow_runs``), and the diagnostic figures a trial logs (``plots``).

    >>> from sweeper.tracking.mlflow_runs import redact
    >>> redact("s3://KEY:SECRET@bucket/cache?x=1&secret_key=abc")
    's3://***@bucket/cache?x=1&secret_key=***'
"""

__all__ = ["mlflow_runs", "plots"]
