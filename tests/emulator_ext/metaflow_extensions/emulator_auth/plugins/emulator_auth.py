"""Credentials for the loopback emulators the tests start (see tests/emulators.py).

Azurite (with ``--oauth basic``) accepts a bearer token whose issuer, audience and lifetime look
like Entra ID's and does not check its signature; fake-gcs-server accepts anonymous requests.
"""
from __future__ import annotations

import base64
import json
import time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class AzuriteToken:
    """A TokenCredential with a token Azurite's basic OAuth check accepts."""

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        now = int(time.time())
        claims = {"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
                  "iat": now - 60, "nbf": now - 60, "exp": now + 3600}
        token = ".".join([_b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
                          _b64(json.dumps(claims).encode()), _b64(b"unsigned")])
        return AccessToken(token, now + 3600)

    def close(self) -> None:
        pass

    def __hash__(self) -> int:  # Metaflow caches clients by credential
        return 1

    def __eq__(self, other) -> bool:
        return isinstance(other, AzuriteToken)


class AzuriteTokenProvider:
    name = "azurite-token"

    @staticmethod
    def create_cacheable_azure_credential(*args, **kwargs):
        return AzuriteToken()


class GcsEmulatorProvider:
    name = "gcs-emulator"
    project = "test"

    @staticmethod
    def get_gs_storage_client(*args, **kwargs):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(credentials=AnonymousCredentials(), project=GcsEmulatorProvider.project)

    @staticmethod
    def get_credentials(scopes, *args, **kwargs):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials(), GcsEmulatorProvider.project
