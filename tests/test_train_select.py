"""Layer selection: probe accuracy per layer, top-k, and the artifact metadata."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actedit.interventions import HPRIntervention, artifact_metadata, build_hpr_config, intervenable, save_artifact
from actedit.train.select import (
    LayerSelection,
    probe_accuracy,
    rank_layers,
    select_layers,
    select_top_layers,
)
from actedit.train.trainer import PairedActivations
from conftest import tiny_model


def pairs(n=200, d=32, layers=3, seed=0):
    """Pairs separated along u_l = e_l (a coordinate axis) in every layer."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in range(layers):
        u = torch.zeros(d)
        u[layer] = 1.0
        c = torch.randn(n, d, generator=g)
        c[:, layer] = 0
        pos[layer] = c + 1.5 * u + 0.3 * torch.randn(n, d, generator=g)
        neg[layer] = c - 1.5 * u + 0.3 * torch.randn(n, d, generator=g)
    return PairedActivations(pos, neg)


def modules_with_probes(d=32, good=(0, 2), layers=3):
    """HPR modules whose probe is the separating axis on ``good`` layers and random elsewhere."""
    torch.manual_seed(0)
    modules = {}
    for layer in range(layers):
        module = HPRIntervention(embed_dim=d)
        with torch.no_grad():
            if layer in good:
                module.probe.weight.zero_()
                module.probe.weight[0, layer] = 1.0
            else:
                module.probe.weight.copy_(F.normalize(torch.randn(1, d), dim=-1))
        modules[layer] = module
    return modules


def test_probe_accuracy_equals_independent_count():
    data = pairs()
    torch.manual_seed(1)
    modules = {layer: HPRIntervention(embed_dim=32) for layer in range(3)}
    got = probe_accuracy(modules, data, batch_size=64)  # several chunks
    for layer, module in modules.items():
        w = module.probe.weight.detach().numpy().reshape(-1)
        p, q = data.positive[layer].numpy() @ w, data.negative[layer].numpy() @ w
        expected = (np.sum(p > 0) + np.sum(q <= 0)) / (2 * len(p))
        assert got[layer] == pytest.approx(expected)


def test_select_layers_picks_the_separating_layers():
    data = pairs()
    selection = select_layers(modules_with_probes(), data, k=2)
    assert selection.selected == [0, 2]
    assert selection.accuracy[0] == pytest.approx(1.0) and selection.accuracy[2] == pytest.approx(1.0)
    assert selection.accuracy[1] < 0.9
    assert selection.ranking[:2] == [0, 2] and selection.num_pairs == 200


def test_top_k_ranking_ties_and_caps():
    accuracy = {0: 0.6, 1: 0.9, 2: 0.9, 3: 0.7, 4: 0.95}
    assert rank_layers(accuracy) == [4, 1, 2, 3, 0]  # tie 1/2: the lower layer first
    assert select_top_layers(accuracy, 3) == [1, 2, 4]
    assert select_top_layers(accuracy, 10) == [0, 1, 2, 3, 4]  # capped at the layers available
    selection = LayerSelection(scores=accuracy)  # default k = 5 (HPR's README)
    assert selection.k == 5 and selection.selected == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k must be"):
        select_top_layers(accuracy, 0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        LayerSelection(scores={0: 1.5})
    with pytest.raises(ValueError, match="at least one layer"):
        LayerSelection(scores={})
    with pytest.raises(ValueError, match="have no probe_accuracy"):
        LayerSelection(scores={0: 0.5}, selected=[3])


def test_selection_metadata_goes_into_the_artifact(tmp_path):
    data = pairs()
    modules = modules_with_probes()
    selection = select_layers(modules, data, k=2)
    meta = selection.metadata()
    assert meta["layer_selection"]["metric"] == "probe_accuracy"
    assert meta["layer_selection"]["selected"] == [0, 2]
    assert set(meta["layer_selection"]["accuracy"]) == {"0", "1", "2"}
    model = tiny_model("llama")  # hidden 32, three layers
    config = build_hpr_config(model, selection.selected, modules=modules)
    pvm = intervenable(model, config)
    directory = save_artifact(pvm, tmp_path / "hpr", metadata=meta)
    stored = artifact_metadata(directory)
    assert stored["layer_selection"] == meta["layer_selection"]
    assert stored["edits"][0]["layers"] == [0, 2]
    again = LayerSelection.from_metadata(stored)
    assert again.selected == selection.selected and again.accuracy == pytest.approx(selection.accuracy)


def test_input_errors():
    with pytest.raises(ValueError, match="no layers"):
        probe_accuracy({5: HPRIntervention(embed_dim=32)}, pairs())
    with pytest.raises(ValueError, match="probe_logits"):
        probe_accuracy({0: torch.nn.Linear(32, 1)}, pairs())
    with pytest.raises(ValueError, match="PairedActivations"):
        probe_accuracy(modules_with_probes(), {0: torch.zeros(3, 32)})
