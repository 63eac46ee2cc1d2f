"""Artifacts saved by actedit 0.1.0 before the registry redesign still load, with stock pyvene and
with actedit, and give the logits they gave then (see ``tests/data/legacy_artifacts/ORIGIN.md``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pyvene as pv
import torch

import actedit
from actedit.interventions.edits import config_of, interventions_of
from actedit.interventions.registry import method_names, spec_of
from conftest import tiny_model

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_artifacts"
NAMES = ["hpr", "sea", "iti", "caa", "actadd", "composed"]


@pytest.fixture(scope="module")
def reference():
    return torch.load(LEGACY / "reference.pt", weights_only=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loader", ["stock pyvene", "actedit.load"])
def test_legacy_artifact_gives_the_same_logits(reference, name, loader):
    model = tiny_model("llama")
    path = str(LEGACY / name)
    pvm = pv.IntervenableModel.load(path, model) if loader == "stock pyvene" else actedit.load(path, model)
    with torch.no_grad():
        _, out = pvm(dict(reference["inputs"]), unit_locations=None)
    assert torch.allclose(out.logits, reference["logits"][name], atol=1e-6, rtol=0)
    for module in interventions_of(pvm):
        assert spec_of(module) is not None and spec_of(module).name in method_names()


def test_legacy_artifacts_compose_with_new_ones(reference):
    model = tiny_model("llama")
    parts = [actedit.load(LEGACY / name, model) for name in ("caa", "hpr")]
    representations = sum(len(config_of(p).representations) for p in parts)
    both = actedit.compose(*parts)
    assert [e["method"] for e in both.config.actedit["edits"]] == ["caa", "hpr"]
    assert representations == len(both.config.representations)
