"""ITI: only the selected heads' slices move, by exactly alpha * sigma * direction; the fit (probes,
head ranking, directions, sigmas) against the official recipe written with scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from actedit.interventions import ITIIntervention, mass_mean_directions
from actedit.interventions.iti import fit_iti
from conftest import tiny_model


def make_iti(alpha=15.0):
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    sigmas = torch.rand(4) + 0.5
    return (
        ITIIntervention(
            embed_dim=32,
            num_heads=4,
            directions=directions,
            sigmas=sigmas,
            heads=[1, 3],
            alpha=alpha,
            position_policy="all",
        ),
        directions,
        sigmas,
    )


def test_only_selected_heads_shift_exactly():
    iti, directions, sigmas = make_iti()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out = iti.double()(x)
    delta = (out - x).reshape(2, 5, 4, 8)
    assert torch.equal(delta[:, :, 0], torch.zeros_like(delta[:, :, 0]))
    assert torch.equal(delta[:, :, 2], torch.zeros_like(delta[:, :, 2]))
    for h in (1, 3):
        expected = 15.0 * sigmas[h].double() * directions[h].double()
        assert torch.allclose(delta[:, :, h], expected.expand(2, 5, 8), atol=1e-12)
    assert iti.selected_heads == [1, 3]


def test_o_proj_bias_is_equivalent():
    iti, _, _ = make_iti()
    w = torch.randn(32, 32, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)
    iti = iti.double()
    assert torch.allclose(iti(x[None])[0] @ w.T, x @ w.T + iti.o_proj_bias(w))


def test_mass_mean_matches_numpy():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(30, 16))
    labels = rng.integers(0, 2, size=30)
    directions, sigmas = mass_mean_directions(torch.tensor(acts), torch.tensor(labels), num_heads=2)
    for h in range(2):
        a = acts[:, h * 8 : (h + 1) * 8]
        d = a[labels == 1].mean(0) - a[labels == 0].mean(0)
        d = d / np.linalg.norm(d)
        assert np.allclose(directions[h].numpy(), d, atol=1e-6)
        assert np.isclose(sigmas[h].item(), np.std(a @ d), atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="divide"):
        ITIIntervention(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="out of range"):
        ITIIntervention(embed_dim=32, num_heads=4, directions=torch.ones(4, 8), heads=[4])
    with pytest.raises(ValueError, match="both true and false"):
        mass_mean_directions(torch.ones(3, 8), torch.ones(3), num_heads=2)


def test_head_count_resizes_on_load():
    iti, _, _ = make_iti()
    fresh = ITIIntervention(embed_dim=32)  # pyvene builds with defaults (1 head)
    fresh.load_state_dict(iti.state_dict())
    x = torch.randn(1, 3, 32)
    assert fresh.num_heads == 4 and torch.equal(fresh(x), iti(x))


# ------------------------------------------------------------------- fit_iti (the recipe)
def iti_data(seed, n, num_heads=4, head_dim=8, layers=(0, 1)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    acts = {}
    for layer in layers:
        x = rng.normal(size=(n, num_heads, head_dim))
        for head in range(num_heads):  # signal strength grows with layer and head
            shift = rng.normal(size=head_dim) * 0.25 * (head + 2 * layer)
            x[labels == 1, head] += shift
        acts[layer] = x.reshape(n, num_heads * head_dim)
    return acts, labels


def independent_iti(train, y_train, val, y_val, num_heads, top_k, direction, seed=0):
    """The official recipe written out with numpy / sklearn."""
    accs, coefs = {}, {}
    for layer in sorted(train):
        ht = train[layer].reshape(len(train[layer]), num_heads, -1)
        hv = val[layer].reshape(len(val[layer]), num_heads, -1)
        for head in range(num_heads):
            clf = LogisticRegression(random_state=seed, max_iter=1000).fit(ht[:, head], y_train)
            accs[(layer, head)] = np.mean(clf.predict(hv[:, head]) == y_val)
            coefs[(layer, head)] = clf.coef_.reshape(-1)
    ranked = sorted(accs, key=lambda lh: (-accs[lh], lh[0], lh[1]))[:top_k]
    out = {}
    for layer, head in ranked:
        usable = np.concatenate([train[layer], val[layer]]).reshape(-1, num_heads, train[layer].shape[1] // num_heads)
        labels = np.concatenate([y_train, y_val])
        if direction == "mass_mean":
            vec = usable[labels == 1, head].mean(0) - usable[labels == 0, head].mean(0)
        else:
            vec = coefs[(layer, head)]
        vec = vec / np.linalg.norm(vec)
        sigma = np.std(usable[:, head] @ vec)
        out[(layer, head)] = (vec, sigma)
    return ranked, accs, out


@pytest.mark.parametrize("direction", ["mass_mean", "probe"])
def test_iti_equals_sklearn_recipe(direction):
    train, y_train = iti_data(0, 120)
    val, y_val = iti_data(1, 60)
    fit = fit_iti(train, y_train, val, y_val, num_heads=4, top_heads=3, direction=direction, alpha=7.0)
    ranked, accs, expected = independent_iti(train, y_train, val, y_val, 4, 3, direction)
    assert fit.selected == ranked
    for layer in (0, 1):
        np.testing.assert_allclose(fit.val_accuracy[layer].numpy(), [accs[(layer, h)] for h in range(4)])
    chosen_layers = sorted({layer for layer, _ in ranked})
    assert sorted(fit.heads) == chosen_layers
    for layer in chosen_layers:
        spec = fit.heads[layer]
        assert spec["heads"] == sorted(h for lay, h in ranked if lay == layer)
        for head in range(4):
            if head in spec["heads"]:
                vec, sigma = expected[(layer, head)]
                np.testing.assert_allclose(spec["directions"][head].numpy(), vec, atol=1e-6)
                np.testing.assert_allclose(float(spec["sigmas"][head]), sigma, rtol=1e-6)
            else:
                assert torch.count_nonzero(spec["directions"][head]) == 0
    assert fit.alpha == 7.0 and fit.direction == direction


def test_iti_top_k_capped_and_config_built():
    train, y_train = iti_data(2, 60)
    val, y_val = iti_data(3, 30)
    fit = fit_iti(train, y_train, val, y_val, num_heads=4)  # default K = 48 > 8 heads available
    assert len(fit.selected) == 8 and len(fit.ranking) == 8
    assert [fit.ranking[i][2] for i in range(8)] == sorted((r[2] for r in fit.ranking), reverse=True)
    model = tiny_model("llama")  # 4 heads x 8 = o_proj input width 32
    config = fit.config(model)
    for rep in config.representations:
        module, spec = rep.intervention, fit.heads[rep.layer]
        assert rep.component == "attention_value_output"
        assert torch.equal(module.directions, spec["directions"]) and torch.equal(module.sigmas, spec["sigmas"])
        assert module.selected_heads == spec["heads"] and float(module.alpha) == 15.0
    assert len(config.actedit["fit"]["selected"]) == 8
    with pytest.raises(ValueError, match="heads"):
        fit.config(tiny_model("llama", num_attention_heads=2, num_key_value_heads=2))


def test_iti_tuning_acts_set_sigma():
    train, y_train = iti_data(4, 80)
    val, y_val = iti_data(5, 40)
    tuning, _ = iti_data(6, 50)
    fit = fit_iti(train, y_train, val, y_val, num_heads=4, top_heads=2, tuning_acts=tuning)
    for layer, head in fit.selected:
        unit = fit.heads[layer]["directions"][head].double().numpy()
        expected = np.std(tuning[layer].reshape(50, 4, 8)[:, head] @ unit)
        np.testing.assert_allclose(float(fit.heads[layer]["sigmas"][head]), expected, rtol=1e-5)


def test_fit_iti_bad_inputs_raise_clear_errors():
    train, y = iti_data(10, 40)
    with pytest.raises(ValueError, match="both"):
        fit_iti(train, np.ones(40), train, y, num_heads=4)
    with pytest.raises(ValueError, match="binary"):
        fit_iti(train, y * 2 + 1, train, y, num_heads=4)
    with pytest.raises(ValueError, match="one label per row"):
        fit_iti(train, y[:-1], train, y, num_heads=4)
    with pytest.raises(ValueError, match="divisible"):
        fit_iti(train, y, train, y, num_heads=5)
    with pytest.raises(ValueError, match="direction"):
        fit_iti(train, y, train, y, num_heads=4, direction="random")
    with pytest.raises(ValueError, match="top_heads"):
        fit_iti(train, y, train, y, num_heads=4, top_heads=0)
    with pytest.raises(ValueError, match="layers"):
        fit_iti(train, y, {0: train[0]}, y, num_heads=4)
    bad = {k: v.copy() for k, v in train.items()}
    bad[1][0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_iti(bad, y, train, y, num_heads=4)
