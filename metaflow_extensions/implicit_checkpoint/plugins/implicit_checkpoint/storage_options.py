"""How to reach a checkpoint root, taken from Metaflow's own configuration.

With ``--datastore s3`` checkpoints live beside Metaflow's artifacts and must reach S3 the way
Metaflow does, with no extra setup: the same endpoint (``METAFLOW_S3_ENDPOINT_URL``, e.g. MinIO),
the same client parameters and certificate check (``METAFLOW_DATATOOLS_CLIENT_PARAMS``,
``METAFLOW_S3_VERIFY_CERTIFICATE``) and server-side encryption (``METAFLOW_S3_SERVER_SIDE_ENCRYPTION``).
Credentials are not copied: s3fs reads the same environment, profile or instance role as boto3.

With ``--datastore azure`` (adlfs) they reach the account Metaflow uses
(``METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT``) with the credential Metaflow's Azure client
provider makes (``METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER``, by default ``DefaultAzureCredential``);
adlfs's own ``AZURE_STORAGE_CONNECTION_STRING``, when set, is used instead. With ``--datastore gs``
(gcsfs) they use the credentials and project of Metaflow's GCP client provider
(``METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER``, by default ``google.auth.default()``); an emulator is
reached through ``STORAGE_EMULATOR_HOST``, as by Google's own client.

Building options touches no network for S3 and Azure; for GCS, finding the default credentials
may (as it does for Metaflow). The first request is made by the first save or load.
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit

from .exceptions import CheckpointConfigError
from .retry import RetryPolicy

S3_PROTOCOLS = ("s3", "s3a")
AZURE_PROTOCOLS = ("az", "abfs", "abfss")
GCS_PROTOCOLS = ("gs", "gcs")
GCS_SCOPES = ("https://www.googleapis.com/auth/devstorage.full_control",)  # among what Metaflow asks for
# As for S3: a dead endpoint is given up on after 10 s per try, a silent one after 20 s without
# a byte. adlfs and gcsfs keep their clients' own retries (no switch); store.py bounds each call.
_TIMEOUTS = {"connect": 10, "read": 20}


def datastore_url(datastore_type: str, datastore_root: str) -> str:
    """Metaflow's datastore root as an fsspec URL: Metaflow writes an Azure root as
    ``<container>/<prefix>``, with no scheme; S3 and GCS roots are URLs already."""
    if datastore_type == "azure" and "://" not in datastore_root:
        return f"abfs://{datastore_root}"  # adlfs names its URLs abfs://
    return datastore_root


def storage_options(url: str) -> dict:
    """fsspec storage options for ``url``: Metaflow's settings for S3, Azure and GCS, else none."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in AZURE_PROTOCOLS:
        return _azure_options()
    if protocol in GCS_PROTOCOLS:
        return _gcs_options(url)
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


def _azure_options() -> dict:
    from metaflow import metaflow_config as config

    options = {"connection_timeout": _TIMEOUTS["connect"], "read_timeout": _TIMEOUTS["read"],
               "use_listings_cache": False}
    endpoint = config.AZURE_STORAGE_BLOB_SERVICE_ENDPOINT
    if not endpoint or os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        return options  # adlfs reads its own settings
    from metaflow.plugins.azure.azure_credential import create_cacheable_azure_credential

    parts = urlsplit(endpoint.rstrip("/"))
    path = parts.path.strip("/")
    # adlfs wants the account name and the URL's host (it adds https://, which Metaflow's bearer
    # tokens require anyway); an emulator's URL names the account in its path.
    return {
        **options,
        "account_name": path.split("/")[0] if path else parts.hostname.split(".")[0],
        "account_host": parts.netloc + (f"/{path}" if path else ""),
        "credential": create_cacheable_azure_credential(),
    }


def _gcs_options(url: str) -> dict:
    from metaflow.plugins.gcp.gs_storage_client_factory import get_credentials

    try:
        credentials, project = get_credentials(list(GCS_SCOPES))
    except Exception as exc:
        raise CheckpointConfigError(
            f"Cannot reach checkpoint storage {url}: Metaflow's GCP credentials failed "
            f"({type(exc).__name__}: {exc}). Set them up as for `--datastore gs` (e.g. "
            "`gcloud auth application-default login`)."
        ) from exc
    return {"token": credentials, "project": project, "use_listings_cache": False}


def retry_policy() -> RetryPolicy:
    """Transient faults are retried for ``METAFLOW_IMPLICIT_CHECKPOINT_RETRY_SECONDS`` (60)."""
    from metaflow.metaflow_config import IMPLICIT_CHECKPOINT_RETRY_SECONDS

    return RetryPolicy(deadline=float(IMPLICIT_CHECKPOINT_RETRY_SECONDS))
