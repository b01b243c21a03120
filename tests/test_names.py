"""adapters/names.py: what a client may call an adapter, and the names vLLM sees."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.errors import InvalidAdapterName
from adapters.names import AdapterRef, parse_ref, validate_name, vllm_name

VALID = ["a", "adp", "my-adapter_v2.1", "0lead-digit", "a" * 64, "a.b"]
INVALID = [
    "", "..", "a..b", "../etc", "a/b", "/abs", "a\\b", "a\x00b", "Upper", "-lead", ".lead", "_lead",
    "a" * 65, "with space", "a~b", "a@b",
    "\u0430dapter",  # Cyrillic 'а' looks like Latin 'a'
    "ａdapter",  # fullwidth
    "ﬁne",  # ligature that NFKC would turn into "fine"
    "adapter\n",
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert validate_name(name) == name
    assert parse_ref(name) == AdapterRef(name, None)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names(name):
    with pytest.raises(InvalidAdapterName):
        validate_name(name)
    with pytest.raises(InvalidAdapterName):
        parse_ref(name)


@pytest.mark.parametrize("text", ["name@v0", "name@v", "name@2", "name@v-1", "name@v1@v2", "@v1", "name@vx",
                                  "name@v1234567890"])
def test_invalid_refs(text):
    with pytest.raises(InvalidAdapterName):
        parse_ref(text)


def test_pinned_ref():
    ref = parse_ref("name@v2")
    assert ref == AdapterRef("name", 2) and str(ref) == "name@v2"


def test_vllm_name_validates_its_parts():
    assert vllm_name("acme", "adp", 3) == "acme~adp@v3"
    with pytest.raises(InvalidAdapterName):
        vllm_name("acme", "../x", 1)
    with pytest.raises(ValueError):
        vllm_name("Acme/..", "adp", 1)


tenants = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(lambda n: ".." not in n)
versions = st.integers(min_value=1, max_value=10**9 - 1)


def _split(served: str) -> tuple[str, str, int]:
    tenant, rest = served.split("~", 1)
    name, version = rest.rsplit("@v", 1)
    return tenant, name, int(version)


@given(tenants, names, versions)
def test_vllm_name_round_trips(tenant, name, version):
    # An inverse exists, so distinct (tenant, name, version) can never share a served name or folder.
    served = vllm_name(tenant, name, version)
    assert _split(served) == (tenant, name, version)
    assert "/" not in served and ".." not in served


@pytest.mark.parametrize("a, b", [
    (("ab", "c", 1), ("a", "bc", 1)),  # naive concatenation would collide
    (("a", "b1", 1), ("a", "b", 11)),
    (("a-b", "c", 1), ("a", "b-c", 1)),
    (("acme", "x", 1), ("default", "x", 1)),
])
def test_vllm_name_separates_near_collisions(a, b):
    assert vllm_name(*a) != vllm_name(*b)
