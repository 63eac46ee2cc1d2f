"""Diff (the HPR paper's difference-vector baseline): the edit and the loss against the paper's
description written out, the stacked loss against each layer's own, training on pairs, and the
layer selection by eval loss."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from actedit.data.store import PairedActivations
from actedit.interventions import DiffIntervention, DiffSettings
from actedit.train.trainer import PairObjective, TrainSettings, new_interventions, train_top_layers


def written_out(module: DiffIntervention, h: torch.Tensor) -> torch.Tensor:
    """h + α σ f(h/σ), f's linear layers applied by hand with GELU between."""
    linears = [m for m in module.net if isinstance(m, torch.nn.Linear)]
    sigma = float(module.input_scale[0])
    out = h / sigma
    for i, layer in enumerate(linears):
        out = out @ layer.weight.T + layer.bias
        if i < len(linears) - 1:
            out = F.gelu(out)
    return h + float(module.alpha) * sigma * out


def shifted_pairs(n, seed, layers=3, d=16, shift=3.0, noise=0.1):
    """h⁻ = h⁺ − shift·u_l: the difference to the positive is the constant shift·u_l."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in range(layers):
        u = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(50 + layer)), dim=0)
        p = torch.randn(n, d, generator=g) * (1 + layer)
        pos[layer] = p
        neg[layer] = p - shift * (1 + layer) * u + noise * torch.randn(n, d, generator=g)
    return PairedActivations(pos, neg)


def test_edit_is_the_activation_plus_the_predicted_difference():
    torch.manual_seed(0)
    module = DiffIntervention(embed_dim=12, alpha=0.7, hidden_widths=[5, 3])
    module.prepare(4.0 * torch.randn(200, 12))
    assert float(module.input_scale[0]) == pytest.approx(4.0, rel=0.15)
    h = 4.0 * torch.randn(2, 3, 12)
    assert torch.allclose(module(h), written_out(module, h), atol=1e-5)


def test_loss_is_the_mse_to_the_difference_to_the_positive():
    torch.manual_seed(1)
    module = DiffIntervention(embed_dim=8)
    module.prepare(torch.randn(64, 8) * 2)
    hp, hn = torch.randn(5, 8), torch.randn(5, 8)
    sigma = float(module.input_scale[0])
    x = torch.cat([hp, hn])
    target = torch.cat([torch.zeros_like(hp), hp - hn]) / sigma
    linears = [m for m in module.net if isinstance(m, torch.nn.Linear)]
    pred = F.gelu((x / sigma) @ linears[0].weight.T + linears[0].bias) @ linears[1].weight.T + linears[1].bias
    expected = ((pred - target) ** 2).sum() / (2 * 5 * 8)
    assert module.diff_loss(hp, hn).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        module.diff_loss(hp, hn[:3])


def test_stacked_loss_equals_each_layers_own_loss():
    data = shifted_pairs(32, 0)
    modules = new_interventions("diff", 16, [0, 1, 2], seed=3)
    for layer, m in modules.items():
        m.prepare(torch.cat([data.positive[layer], data.negative[layer]]))
    config = TrainSettings(progress=False)
    fast = PairObjective(modules, data, None, config)
    assert fast.vectorized and not fast.has_probe and fast.metric == "eval_loss"
    idx = torch.arange(32)
    hp, hn = data.gather([0, 1, 2], idx)
    own = torch.stack([modules[layer].diff_loss(hp[i], hn[i]) for i, layer in enumerate((0, 1, 2))])
    assert torch.allclose(fast._layer_losses(hp, hn), own, rtol=1e-5)


def test_training_learns_the_difference_and_selects_by_eval_loss():
    train, evald = shifted_pairs(256, 0), shifted_pairs(64, 1)
    modules = new_interventions("diff", 16, [0, 1, 2], seed=0)
    config = TrainSettings(epochs=15, learning_rate=3e-3, progress=False)
    result, selection = train_top_layers(modules, train, evald, k=2, config=config)
    assert selection.metric == "eval_loss" and result.metric == "neg_eval_loss"
    assert selection.selected == sorted(selection.ranking[:2])
    ranked = [selection.scores[layer] for layer in selection.ranking]
    assert ranked == sorted(ranked)  # lowest eval loss first
    for layer in selection.selected:
        module = result.modules[layer]
        hn, hp = evald.negative[layer], evald.positive[layer]
        before = (hn - hp).norm(dim=-1).mean()
        after = (module(hn.unsqueeze(0))[0] - hp).norm(dim=-1).mean()
        assert after < 0.5 * before, f"layer {layer}: {after:.3f} vs {before:.3f}"


def test_settings_and_bad_values():
    assert DiffSettings(hidden_widths=[8]).intervention_arguments()["hidden_widths"] == [8]
    with pytest.raises(ValueError, match="input_norm"):
        DiffSettings(input_norm="per_dimension")
    with pytest.raises(ValueError, match="hidden_widths"):
        DiffSettings(hidden_widths=[0])
    with pytest.raises(ValueError, match="shape"):
        DiffIntervention(embed_dim=4).prepare(torch.zeros(0, 4))


def test_saved_widths_and_scale_survive_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    module = DiffIntervention(embed_dim=10, hidden_widths=[3], alpha=2.0)
    module.prepare(torch.randn(50, 10) * 7)
    h = torch.randn(1, 4, 10) * 7
    torch.save({"state": module.state_dict(), "h": h, "out": module(h)}, tmp_path / "m.pt")
    code = (
        "import torch; from actedit.interventions import DiffIntervention;"
        f"s = torch.load({str(tmp_path / 'm.pt')!r});"
        "m = DiffIntervention(embed_dim=10); m.load_state_dict(s['state']);"
        "assert torch.equal(m(s['h']), s['out']), 'outputs differ'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
