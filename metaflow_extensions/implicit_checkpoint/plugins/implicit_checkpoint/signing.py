"""Manifest seals: a checksum always, an HMAC when a secret is configured.

Payloads are verified against the hash their manifest records, so the manifest is what must be
trusted. Every manifest ends with a seal over the exact bytes before it (the checkpoint's JSON
line and its inline payloads), so checking it re-serializes nothing:

- ``sha256``: always. Catches accidental damage (a bit flip, a truncation) of the manifest itself.
- ``hmac-sha256``: when ``$METAFLOW_IMPLICIT_CHECKPOINT_SECRET`` is set. Anyone who can write to the
  storage can forge a checksum, not an HMAC: with a secret set, a manifest whose HMAC is missing or
  wrong is refused before any of its payloads is read, so nothing it names is ever unpickled.
  With a secret set, payloads are also addressed by sha256 instead of xxh3-128 (fast, but not
  collision-resistant), so a signed manifest pins the exact bytes of every payload it names.

The secret is read from the environment at each use, not at import, so a secret that a Metaflow
decorator (``@secrets``, ``@environment``) puts in the environment when the task starts is seen.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Optional

from .exceptions import CheckpointCorrupt, CheckpointUntrusted

SECRET_ENV = "METAFLOW_IMPLICIT_CHECKPOINT_SECRET"


@dataclass(frozen=True)
class Sealer:
    """Adds and checks manifest seals. ``secret`` overrides the environment variable ``env``."""

    secret: Optional[str] = None
    env: Optional[str] = SECRET_ENV

    def key(self) -> Optional[bytes]:
        secret = self.secret or (os.environ.get(self.env) if self.env else None)
        return secret.encode() if secret else None

    def fixed(self) -> "Sealer":
        """This sealer with the environment read once (for checking many manifests in a row)."""
        key = self.key()
        return Sealer(secret=key.decode() if key else None, env=None)

    def seal(self, data: bytes) -> dict:
        """The seal of ``data``."""
        seal = {"sha256": hashlib.sha256(data).hexdigest()}
        key = self.key()
        if key is not None:
            seal["hmac-sha256"] = hmac.new(key, data, hashlib.sha256).hexdigest()
        return seal

    def verify(self, data: bytes, seal: object, url: str) -> None:
        """Refuse a manifest whose seal does not match; with a secret, one not signed with it."""
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
                f"The manifest at {url} is not signed, and ${self.env or SECRET_ENV} is set: only checkpoints "
                "signed with that secret are loaded. None of its payloads was read."
            )
        if not hmac.compare_digest(signature, hmac.new(key, data, hashlib.sha256).hexdigest()):
            raise CheckpointUntrusted(
                f"The manifest at {url} is signed with another secret than ${self.env or SECRET_ENV}, or was "
                "altered: it is refused and none of its payloads was read."
            )
