"""API keys: what the metadata stores keep about them, and how a presented key is turned into a lookup.

A key is 256 random bits; only its sha256 is ever stored, so a leaked store (or a Redis dump) does not
yield usable keys. A salted slow hash is unnecessary for keys that are not human-chosen: nothing smaller
than the whole key space can be brute-forced. The lookup is by hash, so no secret is compared in Python
and no timing side channel leaks key bytes.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from adapters.names import validate_tenant

KEY_PREFIX = "mlk_"
# Rejects absurd header values before hashing; real keys are len(KEY_PREFIX) + 43 characters.
MAX_KEY_LENGTH = 256
_LABEL_PATTERN = re.compile(r"[\x20-\x7e]{0,64}")


@dataclass
class ApiKey:
    id: str
    tenant: str
    name: str
    key_hash: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApiKey":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key(tenant: str, name: str = "") -> tuple[ApiKey, str]:
    """A fresh record and the plaintext key. The caller shows the key once and keeps only the record."""
    validate_tenant(tenant)
    if _LABEL_PATTERN.fullmatch(name) is None:
        raise ValueError(f"invalid key name {name!r}: up to 64 printable ASCII characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(id="key_" + secrets.token_hex(8), tenant=tenant, name=name, key_hash=hash_key(key),
                    created_at=time.time())
    return record, key
