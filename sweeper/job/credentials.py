"""How credentials reach a sweep: by reference, from each node's own environment, never inside what it writes.

A sweep writes much that outlives it and that more people can read than its credentials are meant for: its config
(logged to MLflow, hashed into the sweep id), Tune's pickled experiment (``tuner.pkl`` and ``searcher-state-*.pkl``,
which hold the Optuna storage and its URL, in ``tune.storage_path``: the shared bucket on a cluster) and Ray's
session logs (``runtime_env_agent.log`` records every actor's runtime environment, env vars included, on every
node). Two rules keep credentials out of all of it:

1. No URL of a config carries a secret (``user:password@``, ``?secret_key=...``): ``uri_problem`` says why one is
   refused and where the secret goes instead (``HOW_TO_PASS``). A URL without its password works as is wherever the
   client reads the password itself: libpq takes ``PGPASSWORD`` or ``~/.pgpass``, MLflow
   ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, pyarrow and boto3 the AWS credential chain.
2. Every process reads credentials from the environment of its node (an IAM role, a mounted Secret, the env of
   ``ray start``), which Ray workers inherit from their raylet. Tune would also copy the driver's
   ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and session token into each trial's runtime_env, where Ray
   logs them in plain text: ``keep_out_of_trial_runtime_env`` stops that.

    >>> secret_in_uri("postgresql+psycopg2://bgad:hunter2@db/optuna")
    'a password (user:password@)'
    >>> secret_in_uri("postgresql+psycopg2://bgad@db/optuna") is None
    True
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from bgad_core.errors import ConfigError

# Query parameters that carry a secret (also what ``tracking.redact`` masks in text).
SECRET_QUERY_KEY = r"[a-z0-9_-]*(?:secret|password|passwd|token|access_key|signature)[a-z0-9_-]*"
_SECRET_KEY = re.compile(rf"(?i){SECRET_QUERY_KEY}")
# Driver environment variables Tune puts into every trial actor's runtime_env (ray.tune.execution.class_cache).
TUNE_FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
HOW_TO_PASS = {
    "postgresql": "drop the password from the URL: libpq reads PGPASSWORD or ~/.pgpass (PGPASSFILE) on the driver",
    "mysql": "drop the password from the URL and name an option file holding it: ?read_default_file=~/.my.cnf",
    "http": "drop it from the URL: MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) from the environment of the driver and of every Ray node",
    "s3": "drop it from the URI: pyarrow and boto3 read the node's IAM role, AWS_SHARED_CREDENTIALS_FILE or "
          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment of every Ray node (cluster/README.md)",
    "gs": "drop it from the URI: use the node's workload identity or GOOGLE_APPLICATION_CREDENTIALS",
}
_SCHEME_FAMILY = {"postgres": "postgresql", "https": "http", "gcs": "gs", "s3a": "s3"}


def secret_in_uri(uri: str) -> str | None:
    """What secret ``uri`` carries (a password in its user info, or secret query parameters), else None."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URL (e.g. an unbalanced "[" in a local path): nothing to find
        return None
    if password is not None:
        return "a password (user:password@)"
    keys = sorted({key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_KEY.fullmatch(key)})
    return f"secret query parameter(s) {', '.join(keys)}" if keys else None


def how_to_pass(uri: str) -> str:
    """Where the secret of ``uri`` goes instead, for its kind of URL."""
    scheme = urlsplit(uri).scheme.lower().split("+")[0]
    family = _SCHEME_FAMILY.get(scheme, scheme)
    return HOW_TO_PASS.get(family, "drop it and let the client read it from the environment of every node")


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` may not be used (it carries a secret, and where that goes instead), or None when it may.

    Rejected rather than masked: the URL would be pickled with Tune's searcher, hashed into the sweep id and handed
    to every trial, and masking can only cover what this project prints itself.
    """
    found = secret_in_uri(uri)
    if found is None:
        return None
    return f"carries {found}, and a sweep writes its URLs to Tune's storage, MLflow and logs; {how_to_pass(uri)}"


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI with a secret: the config's own URLs are checked when it is validated, but the URI
    may come from ``$MLFLOW_TRACKING_URI`` instead."""
    problem = uri_problem(uri)
    if problem is not None:
        raise ConfigError(f"$MLFLOW_TRACKING_URI: {problem}")


def keep_out_of_trial_runtime_env() -> None:
    """Stop Tune from copying the driver's AWS credentials into each trial actor's runtime_env.

    Ray logs a runtime_env verbatim (``runtime_env_agent.log`` on each node, readable by every local user) and
    shows it in the dashboard. Trials do not need the copy: a Ray worker inherits the environment of its node's
    raylet, which is where a node's credentials belong (cluster/README.md), and a local ``ray.init`` starts the
    raylet with the driver's own environment. Idempotent; call it in the driver before ``Tuner.fit``.
    """
    from ray.tune.execution import class_cache  # Ray's own list; absent in another Ray, this fails loudly

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(TUNE_FORWARDED)
