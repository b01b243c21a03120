"""Adapter names, version references and the names vLLM sees.

Clients never send paths: a name is validated here and only ever turned into a folder name by
`vllm_name`, inside one storage root.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidAdapterName

# A leading alphanumeric and no slashes, so a name can never climb out of the storage root.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_REF_PATTERN = re.compile(r"(?P<name>[^@]*)(?:@v(?P<version>[0-9]{1,9}))?")

DEFAULT_TENANT = "default"

# '~' and '@' are not allowed in names, so (tenant, name, version) -> vllm name is injective:
# no choice of name in one tenant can spell another tenant's adapter.
_TENANT_SEPARATOR = "~"


@dataclass(frozen=True)
class AdapterRef:
    """`name` (newest ready version) or `name@vN` (pinned)."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@v{self.version}"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or ".." in name:
        raise InvalidAdapterName(name)
    return name


def validate_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or TENANT_PATTERN.fullmatch(tenant) is None:
        raise ValueError(f"invalid tenant id {tenant!r}")
    return tenant


def parse_ref(text: str) -> AdapterRef:
    match = _REF_PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidAdapterName(text)
    version = match.group("version")
    if version is not None and int(version) < 1:
        raise InvalidAdapterName(text)
    return AdapterRef(validate_name(match.group("name")), int(version) if version else None)


def version_label(name: str, version: int) -> str:
    return f"{name}@v{version}"


def init_folder_name(tenant: str, name: str, version: int) -> str:
    """An init version's folder in the adapter store. Two separators, so it never equals a vllm_name (whose
    name part holds none): no adapter request can resolve to an init's folder."""
    return f"{validate_tenant(tenant)}{_TENANT_SEPARATOR}init{_TENANT_SEPARATOR}{validate_name(name)}@v{int(version)}"


def vllm_name(tenant: str, name: str, version: int) -> str:
    """The LoRA name vLLM serves, and the folder name in the adapter store (flat, one level)."""
    return f"{validate_tenant(tenant)}{_TENANT_SEPARATOR}{validate_name(name)}@v{int(version)}"


def parse_vllm_name(served: str) -> tuple[str, str, int] | None:
    """(tenant, name, version) of a name vllm_name() built; None for anything else (the base model, an init)."""
    tenant, sep, rest = served.partition(_TENANT_SEPARATOR)
    if not sep or TENANT_PATTERN.fullmatch(tenant) is None:
        return None
    try:
        ref = parse_ref(rest)
    except InvalidAdapterName:
        return None
    return None if ref.version is None else (tenant, ref.name, ref.version)
