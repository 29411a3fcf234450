"""Manifest seals: a checksum always, an HMAC when a secret is configured.

Payloads are verified against the sha256 their manifest records, so the manifest is what must be
trusted. Every manifest carries a ``seal`` over its canonical JSON (sorted keys, no whitespace):

- ``sha256``: always. Catches accidental damage (a bit flip, a truncation) of the manifest itself.
- ``hmac-sha256``: when ``$METAFLOW_IMPLICIT_CHECKPOINT_SECRET`` is set. Anyone who can write to the
  storage can forge a checksum, not an HMAC: with a secret set, a manifest whose HMAC is missing or
  wrong is refused before any of its payloads is read, so nothing it names is ever unpickled.

The secret is read from the environment at each use, not at import, so a secret that a Metaflow
decorator (``@secrets``, ``@environment``) puts in the environment when the task starts is seen.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Optional

from .exceptions import CheckpointCorrupt, CheckpointUntrusted

SECRET_ENV = "METAFLOW_IMPLICIT_CHECKPOINT_SECRET"
SEAL = "seal"


def canonical(body: dict) -> bytes:
    """The bytes a seal covers: the body without its seal, sorted and compact."""
    unsealed = {k: v for k, v in body.items() if k != SEAL}
    return json.dumps(unsealed, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


@dataclass(frozen=True)
class Sealer:
    """Adds and checks manifest seals. ``secret`` overrides the environment variable ``env``."""

    secret: Optional[str] = None
    env: str = SECRET_ENV

    def key(self) -> Optional[bytes]:
        secret = self.secret or os.environ.get(self.env)
        return secret.encode() if secret else None

    def seal(self, body: dict) -> dict:
        """``body`` plus its seal (any seal it already carried is replaced)."""
        data = canonical(body)
        seal = {"sha256": hashlib.sha256(data).hexdigest()}
        key = self.key()
        if key is not None:
            seal["hmac-sha256"] = hmac.new(key, data, hashlib.sha256).hexdigest()
        return {**body, SEAL: seal}

    def verify(self, body: dict, url: str) -> None:
        """Refuse a manifest whose seal does not match; with a secret, one not signed with it."""
        seal = body.get(SEAL)
        data = canonical(body)
        if not isinstance(seal, dict) or seal.get("sha256") != hashlib.sha256(data).hexdigest():
            raise CheckpointCorrupt(
                f"The manifest at {url} does not match its checksum: it was damaged after it "
                "was written. Load an earlier checkpoint (see list())."
            )
        key = self.key()
        if key is None:
            return
        signature = seal.get("hmac-sha256")
        if not isinstance(signature, str):
            raise CheckpointUntrusted(
                f"The manifest at {url} is not signed, and ${self.env} is set: only checkpoints "
                "signed with that secret are loaded. None of its payloads was read."
            )
        if not hmac.compare_digest(signature, hmac.new(key, data, hashlib.sha256).hexdigest()):
            raise CheckpointUntrusted(
                f"The manifest at {url} is signed with another secret than ${self.env}, or was "
                "altered: it is refused and none of its payloads was read."
            )
