"""Layer specs: what each form means on a model of a given depth, and the errors that name the depth."""

from __future__ import annotations

import math
import time

import pytest

from actedit.interventions.layers import check_layer_spec, model_depth, resolve_layer, resolve_layers
from conftest import tiny_model


def test_layer_specs_resolve_against_the_depth():
    assert resolve_layers("10-29", 30) == list(range(10, 30))
    assert resolve_layers("1/3:", 30) == list(range(10, 30)) and resolve_layers("1/3:", 32) == list(range(11, 32))
    assert resolve_layers("-20:", 24) == list(range(4, 24)) and resolve_layers([0, -1], 5) == [0, 4]
    assert resolve_layers("all", 3) == [0, 1, 2] and resolve_layers(":2", 6) == [0, 1]
    assert resolve_layer(0.4, 30) == 12 and resolve_layer("2/5", 32) == 13 and resolve_layer(-1, 7) == 6
    with pytest.raises(ValueError, match=r"does not fit the model: it has 24 layers \(0\.\.23\)"):
        resolve_layers("10-29", 24, "methods.sea.settings.layers")
    with pytest.raises(ValueError, match="takes one layer"):
        resolve_layer("1/3:", 30, "methods.caa.settings.layers")
    with pytest.raises(ValueError, match="not a layer index or a depth fraction"):
        resolve_layers(["ten"], 30)
    with pytest.raises(ValueError, match="more than once"):
        resolve_layers([1, -2], 3)


def test_a_slice_is_checked_by_its_ends_without_listing_its_layers():
    started = time.perf_counter()
    check_layer_spec("3:999999")  # a list of a million layers would take seconds and megabytes
    check_layer_spec("all")
    check_layer_spec(None)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValueError, match="selects no layer"):
        check_layer_spec("5:5")
    with pytest.raises(ValueError, match="takes one layer"):
        check_layer_spec([1, 2], "settings.layers", single=True)


def test_fractions_and_negative_indices_follow_the_depth():
    # a fraction f of n layers is the layer nearest to f·n, halves rounded up
    for depth in (12, 18, 24, 30, 32):
        assert resolve_layer(0.4, depth) == math.floor(0.4 * depth + 0.5)
        assert resolve_layer("1/3", depth) == math.floor(depth / 3 + 0.5)
    assert resolve_layers("-2:", 5) == [3, 4] and resolve_layers([-1, 0.5], 10) == [5, 9]
    assert model_depth(tiny_model("llama")) == tiny_model("llama").config.num_hidden_layers
