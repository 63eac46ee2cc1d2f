"""The method registry: every method's spec, its settings class, and the strength every method declares."""

from __future__ import annotations

import dataclasses

import pytest

from actedit.interventions.registry import (
    STRENGTH,
    VIEWS,
    BakedBias,
    MethodSettings,
    TrainedMethodSettings,
    method_names,
    method_spec,
    methods,
    register_method,
    spec_of,
)
from actedit.interventions.settings import UnknownSettingError

STRENGTHS = {"hpr": "alpha", "sea": None, "iti": "alpha", "caa": "multiplier", "actadd": "coefficient"}


def test_every_method_is_registered_in_composition_order():
    assert method_names() == ["actadd", "caa", "iti", "sea", "hpr", "diff"]
    assert [s.order for s in methods()] == sorted(s.order for s in methods())
    for spec in methods():
        assert method_spec(spec.name.upper()) is spec
        assert spec_of(spec.intervention) is spec
        assert spec.reads in VIEWS
        assert issubclass(spec.settings_class, TrainedMethodSettings if spec.trained else MethodSettings)


def test_every_method_says_whether_and_how_it_bakes_into_biases():
    bakeable = {s.name for s in methods() if s.bake is not None}
    assert bakeable == {"iti", "caa"}
    for spec in methods():
        assert (spec.bake is None) == bool(spec.not_bakeable), spec.name  # a way, or the reason why not
    with pytest.raises(ValueError, match="slot must be one of"):
        BakedBias("q_proj", None)


@pytest.mark.parametrize("name", sorted(STRENGTHS))
def test_every_method_declares_its_strength(name):
    spec = method_spec(name)
    assert spec.strength == STRENGTHS[name]
    if spec.strength is None:
        with pytest.raises(UnknownSettingError, match=rf"{name} has no strength setting"):
            spec.settings({STRENGTH: 2.0})
        return
    by_strength = spec.settings({STRENGTH: 2.5}, layers=[1])
    by_name = spec.settings({spec.strength: 2.5}, layers=[1])
    assert by_strength == by_name and getattr(by_strength, spec.strength) == 2.5
    assert spec.settings(by_name) == by_name  # settings objects pass through
    with pytest.raises(UnknownSettingError, match=rf"give strength or {spec.strength}, not both"):
        spec.settings({STRENGTH: 1.0, spec.strength: 2.0})


def test_a_spec_checks_what_it_declares():
    hpr = method_spec("hpr")
    with pytest.raises(ValueError, match="strength names 'power'"):
        dataclasses.replace(hpr, strength="power")
    with pytest.raises(ValueError, match="reads must be one of"):
        dataclasses.replace(hpr, reads="pairs")
    with pytest.raises(ValueError, match="exactly one of a fit function or trained=True"):
        dataclasses.replace(hpr, trained=False)
    with pytest.raises(ValueError, match="settings_class must derive from TrainedMethodSettings"):
        dataclasses.replace(hpr, settings_class=MethodSettings)
    with pytest.raises(ValueError, match="already registered"):
        register_method(dataclasses.replace(hpr, title="another HPR"))
    assert register_method(hpr) is hpr  # the same spec again is a no-op
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        method_spec("rome")


def test_unknown_and_bad_settings_are_errors_naming_the_key():
    with pytest.raises(UnknownSettingError, match=r"did you mean 'multiplier'"):
        method_spec("caa").settings({"multipler": 2})
    with pytest.raises(ValueError, match="top_layers must be a positive integer"):
        method_spec("hpr").settings({"top_layers": 0})
