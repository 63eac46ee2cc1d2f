"""Typed settings: built from mappings, unknown and moved keys refused with the fix, keywords checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import pytest

from actedit.interventions.settings import (
    Settings,
    UnknownSettingError,
    check_keys,
    check_moved,
    keyword_checked,
    unknown_keys_message,
)


@dataclass
class Example(Settings):
    MOVED = {"rate": "learning_rate"}

    learning_rate: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")


def test_from_mapping_merges_keywords_and_validates():
    made = Example.from_mapping({"learning_rate": 0.1}, "train", tags=["a"])
    assert made == Example(learning_rate=0.1, tags=["a"])
    assert Example.from_mapping(None) == Example()
    assert Example.from_mapping(made) == made  # an instance passes through as its values
    assert made.to_dict() == {"learning_rate": 0.1, "betas": [0.9, 0.999], "tags": ["a"]}
    assert Example.field_names() == ["learning_rate", "betas", "tags"]
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        Example.from_mapping({"learning_rate": -1})
    with pytest.raises(ValueError, match=r"train must be a mapping of settings, got list"):
        Example.from_mapping([1, 2], "train")


def test_unknown_and_moved_keys_name_the_fix():
    with pytest.raises(UnknownSettingError) as info:
        Example.from_mapping({"learning_rat": 1.0, "tag": []}, "methods.hpr.train")
    message = str(info.value)
    assert message.startswith("unknown keys methods.hpr.train.learning_rat (did you mean 'learning_rate'?)")
    assert "methods.hpr.train.tag (did you mean 'tags'?)" in message
    assert message.endswith("valid keys of methods.hpr.train: betas, learning_rate, tags.")
    with pytest.raises(UnknownSettingError, match=r"^train\.rate has moved: set learning_rate instead\.$"):
        Example.from_mapping({"rate": 1.0}, "train")
    assert isinstance(UnknownSettingError("x"), ValueError) and isinstance(UnknownSettingError("x"), TypeError)
    check_keys(["a"], ["a", "b"], "block")  # known keys pass
    check_moved(["a"], {"b": "c"}, "")
    with pytest.raises(UnknownSettingError, match=r"^b has moved: set c instead\.$"):
        check_moved(["b"], {"b": "c"}, "")
    assert unknown_keys_message(["zz"], [], "x") == "unknown key x.zz; valid keys of x: none."


def test_keyword_checked_refuses_mistyped_keywords_and_keeps_the_function():
    @keyword_checked
    def build(model, *, multiplier: float = 1.0, layers=None):
        """Doc."""
        return model, multiplier, layers

    assert build("m", multiplier=2.0) == ("m", 2.0, None)
    assert build.__name__ == "build" and build.__doc__ == "Doc."
    with pytest.raises(
        UnknownSettingError,
        match=r"build\(\) got unknown keyword argument multipler \(did you mean "
        r"'multiplier'\?\); valid: model, multiplier, layers\.",
    ):
        build("m", multipler=2.0)

    def takes_anything(**kwargs):
        return kwargs

    assert keyword_checked(takes_anything) is takes_anything


def test_value_errors_name_the_key_path():
    with pytest.raises(ValueError, match=r"^methods\.hpr\.train\.learning_rate: learning_rate must be positive"):
        Example.from_mapping({"learning_rate": -1, "tags": ["a"]}, "methods.hpr.train")
    with pytest.raises(ValueError, match=r"^learning_rate must be positive"):
        Example.from_mapping({"learning_rate": -1})  # no block: the message names the key already


def test_a_method_setting_error_names_its_key_path():
    from actedit.study import default_config_path, load_study

    with pytest.raises(
        ValueError, match=r"^methods\.iti\.settings\.alpha: ITI alpha must be a finite number, got 'abc'"
    ):
        load_study(str(default_config_path()), ["methods.iti.settings.alpha=abc"])
