"""How to reach a checkpoint root, taken from Metaflow's own configuration.

With ``--datastore s3`` checkpoints live beside Metaflow's artifacts and must reach S3 the way
Metaflow does, with no extra setup: the same endpoint (``METAFLOW_S3_ENDPOINT_URL``, e.g. MinIO),
the same client parameters and certificate check (``METAFLOW_DATATOOLS_CLIENT_PARAMS``,
``METAFLOW_S3_VERIFY_CERTIFICATE``) and server-side encryption (``METAFLOW_S3_SERVER_SIDE_ENCRYPTION``).
Credentials are not copied: s3fs reads the same environment, profile or instance role as boto3.

Building options touches no network; the first request is made by the first save or load.
"""
from __future__ import annotations

from .retry import RetryPolicy

S3_PROTOCOLS = ("s3", "s3a")


def storage_options(url: str) -> dict:
    """fsspec storage options for ``url``: Metaflow's S3 settings for ``s3://``, else none."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in S3_PROTOCOLS:
        return {}
    from metaflow import metaflow_config as config

    # Holds S3_ENDPOINT_URL and S3_VERIFY_CERTIFICATE. Its botocore "config" is left out (Metaflow
    # turns it into a Config object in place once its own S3 client has been made): retries are ours.
    client_kwargs = {k: v for k, v in config.DATATOOLS_CLIENT_PARAMS.items() if k != "config"}
    options = {
        "client_kwargs": client_kwargs,
        # retry.RetryPolicy is the one retry layer, so its time bound holds: botocore's own
        # retries are off (s3fs's too, see store.py), a dead endpoint is given up on after 10 s
        # per try and a silent one after 20 s without a byte (store.py also bounds each call).
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 10, "read_timeout": 20},
        # A listing must show what other processes committed a moment ago.
        "use_listings_cache": False,
    }
    if config.S3_SERVER_SIDE_ENCRYPTION:
        options["s3_additional_kwargs"] = {"ServerSideEncryption": config.S3_SERVER_SIDE_ENCRYPTION}
    return options


def retry_policy() -> RetryPolicy:
    """Transient faults are retried for ``METAFLOW_IMPLICIT_CHECKPOINT_RETRY_SECONDS`` (60)."""
    from metaflow.metaflow_config import IMPLICIT_CHECKPOINT_RETRY_SECONDS

    return RetryPolicy(deadline=float(IMPLICIT_CHECKPOINT_RETRY_SECONDS))
