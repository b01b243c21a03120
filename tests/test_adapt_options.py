"""The wire model (server/protocol.py) and the trainer's AdaptConfig (trainer/config.py) are both built from
adapters/adapt_options.py: they must name the same options, share the defaults and accept exactly the same
values at every bound."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
from pydantic import ValidationError

from adapters.adapt_options import OPTIONS, InvalidOption
from server.protocol import AdaptRequest
from trainer.config import AdaptConfig

CONFIG_ONLY = {"target_modules"}  # which modules get LoRA: fixed by the service, not a client's choice


def wire_accepts(name: str, value) -> bool:
    try:
        AdaptRequest(adapter="a", examples=[], **{name: value})
    except ValidationError:
        return False
    return True


def config_accepts(name: str, value) -> bool:
    try:
        AdaptConfig(**{name: value})
    except InvalidOption as exc:
        assert exc.name == name
        return False
    return True


def edge_cases(spec):
    """(value, accepted) at and just beyond each bound."""
    for bound, exclusive, outward in ((spec.min, spec.min_exclusive, -1), (spec.max, spec.max_exclusive, 1)):
        if spec.type is int:
            yield bound, True
            yield bound + outward, False
        else:
            inside = math.nextafter(bound, bound - outward)
            outside = math.nextafter(bound, bound + outward)
            yield bound, not exclusive
            yield inside, True
            yield outside, False


def test_wire_and_config_name_the_same_options():
    wire = set(AdaptRequest.model_fields) - {"adapter", "examples", "init"}  # init: where from, not how
    config = {f.name for f in fields(AdaptConfig)} - CONFIG_ONLY
    assert wire == config == set(OPTIONS)


def test_config_defaults_are_the_tables_and_the_wire_leaves_them_to_the_worker():
    defaults = AdaptConfig()
    for name, spec in OPTIONS.items():
        assert getattr(defaults, name) == spec.default and type(getattr(defaults, name)) is spec.type
        # Unset on the wire: the worker's default applies (a shipped shared init may set its own).
        assert AdaptRequest.model_fields[name].default is None
        spec.check(spec.default)
    assert AdaptRequest(adapter="a", examples=[]).options() == {}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_wire_and_config_accept_the_same_values_at_every_bound(name):
    for value, accepted in edge_cases(OPTIONS[name]):
        assert wire_accepts(name, value) is accepted, (name, value)
        assert config_accepts(name, value) is accepted, (name, value)


def test_wire_options_pass_the_config_unchanged():
    request = AdaptRequest(adapter="a", examples=[], steps=2000, learning_rate=0.5, rank=64, max_seq_len=8,
                           seed=2**31 - 1, holdout_fraction=0.0)
    config = AdaptConfig().merged(request.options())
    assert {k: getattr(config, k) for k in request.options()} == request.options()


@pytest.mark.parametrize("name, value", [("steps", True), ("steps", 2.0), ("batch_size", "8"),
                                         ("learning_rate", float("nan")), ("dropout", None)])
def test_config_rejects_non_numbers(name, value):
    assert not config_accepts(name, value)
