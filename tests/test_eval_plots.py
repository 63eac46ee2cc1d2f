"""Plots: the probe-accuracy plot of a layer selection, written beside the artifact."""

from __future__ import annotations

import pytest

from actedit.eval.plots import plot_layer_accuracy, plot_layer_selection

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_layer_accuracy_writes_a_png_and_refuses_other_formats(tmp_path):
    path = plot_layer_accuracy({i: 0.5 + i / 60 for i in range(30)}, tmp_path / "deep" / "p.png", selected=[29, 28])
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    with pytest.raises(ValueError, match="png"):
        plot_layer_accuracy({0: 0.5}, tmp_path / "p.pdf")
    with pytest.raises(ValueError, match="no layer accuracies"):
        plot_layer_accuracy({}, tmp_path / "empty.png")


def test_plot_layer_selection_beside_the_artifact(tmp_path):
    metadata = {"layer_selection": {"accuracy": {"0": 0.5, "1": 0.9, "2": 0.7}, "selected": [1, 2], "k": 2}}
    path = plot_layer_selection(metadata, tmp_path / "artifacts" / "hpr")
    assert path == tmp_path / "artifacts" / "hpr_probe_accuracy.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_layer_selection({"settings": {}}, tmp_path / "artifacts" / "caa") is None
    assert not (tmp_path / "artifacts" / "caa_probe_accuracy.png").exists()
