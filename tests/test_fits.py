"""The methods' closed-form fits (in their modules) against independent numpy / scikit-learn
computations, and bad inputs."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from actedit.interventions.actadd import ActAddSteering, fit_actadd
from actedit.interventions.caa import CAAVectors, fit_caa
from actedit.interventions.iti import fit_iti
from actedit.interventions.sea import SEAFactors, fit_sea

from conftest import tiny_model




def low_rank_acts(n, d, seed, layers=(0, 2)):
    """Activations with a decaying spectrum (so the energy ratio cuts below full rank)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        mix = rng.normal(size=(d, d)) * (0.6 ** np.arange(d))[:, None]
        out[layer] = rng.normal(size=(n, d)) @ mix + 0.01 * rng.normal(size=(n, d))
    return out


# ----------------------------------------------------------------------------------------- SEA
def numpy_sea(H, Hp, phi, ratio):
    """Independent SEA: U of SVD(φ(H)ᵀφ(H±)/N) truncated where cumulative energy reaches ratio."""
    omega = phi(H).T @ phi(Hp) / H.shape[0]
    U, S, _ = np.linalg.svd(omega)
    energy = np.cumsum(S ** 2) / np.sum(S ** 2)
    k = int(np.argmax(energy >= ratio - 1e-12)) + 1
    return U[:, :k]


PHI = {
    "linear": lambda x: x,
    "squared_exponential": lambda x: np.exp(-0.5 * x * x),
    "tanh": np.tanh,
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
}


@pytest.mark.parametrize("feature_function", sorted(PHI))
@pytest.mark.parametrize("ratio", [0.9, 0.998])
def test_sea_equals_numpy_svd(feature_function, ratio):
    d = 12
    H, Hp, Hn = (low_rank_acts(80, d, seed) for seed in (1, 2, 3))
    fit = fit_sea(H, Hp, Hn, energy_ratio=ratio, feature_function=feature_function)
    assert isinstance(fit, SEAFactors) and fit.num_examples == 80
    phi = PHI[feature_function]
    for layer in (0, 2):
        for U, other in ((fit.factors[layer][0], Hp), (fit.factors[layer][1], Hn)):
            expected = numpy_sea(H[layer], other[layer], phi, ratio)
            assert U.dtype == torch.float32 and U.shape == expected.shape
            # singular vectors are defined up to sign: compare the projectors
            got = U.double().numpy()
            np.testing.assert_allclose(got @ got.T, expected @ expected.T, atol=2e-6)
    ranks = fit.ranks
    assert all(0 < k <= d for pair in ranks.values() for k in pair)
    if ratio == 0.9 and feature_function == "linear":
        assert all(k < d for pair in ranks.values() for k in pair)  # the energy cut bites


def test_sea_config_holds_the_factors():
    model = tiny_model("llama")
    H, Hp, Hn = (low_rank_acts(50, 32, seed, layers=(0, 1)) for seed in (4, 5, 6))
    fit = fit_sea(H, Hp, Hn, energy_ratio=0.95)
    config = fit.config(model, norm_mode="feature")
    reps = config.representations
    assert [r.layer for r in reps] == [0, 1] and all(r.component == "mlp_output" for r in reps)
    for rep in reps:
        assert torch.equal(rep.intervention.U_pos, fit.factors[rep.layer][0])
        assert torch.equal(rep.intervention.U_neg, fit.factors[rep.layer][1])
        assert int(rep.intervention.norm_mode) == 1
    assert config.actedit["fit"]["energy_ratio"] == 0.95
    assert config.actedit["edits"][0]["method"] == "sea"


# ----------------------------------------------------------------------------------------- ITI
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


# ---------------------------------------------------------------------------------- CAA, ActAdd
def test_caa_equals_numpy_mean_difference():
    rng = np.random.default_rng(7)
    pos = {3: rng.normal(size=(40, 32)), 5: rng.normal(size=(40, 32)).astype(np.float32)}
    neg = {3: rng.normal(size=(40, 32)), 5: rng.normal(size=(40, 32)).astype(np.float32)}
    fit = fit_caa(pos, neg)
    assert isinstance(fit, CAAVectors) and fit.num_pairs == 40
    for layer in (3, 5):
        expected = np.mean(pos[layer].astype(np.float64) - neg[layer].astype(np.float64), axis=0)
        np.testing.assert_allclose(fit.vectors[layer].numpy(), expected, rtol=1e-6, atol=1e-7)
    model = tiny_model("llama", num_hidden_layers=6)
    config = fit.config(model, multiplier=2.5, position_start=4)
    for rep in config.representations:
        assert torch.equal(rep.intervention.vector, fit.vectors[rep.layer])
        assert float(rep.intervention.multiplier) == 2.5 and int(rep.intervention.position_start) == 4


def test_actadd_equals_numpy_difference():
    rng = np.random.default_rng(8)
    a1 = {1: torch.tensor(rng.normal(size=(5, 32)))}
    a2 = {1: torch.tensor(rng.normal(size=(5, 32)))}
    fit = fit_actadd(a1, a2, coefficient=4.0)
    assert isinstance(fit, ActAddSteering) and fit.length == 5
    np.testing.assert_allclose(fit.steering[1].numpy(), 4.0 * (a1[1].numpy() - a2[1].numpy()), rtol=1e-6)
    config = fit.config(tiny_model("llama"))
    rep = config.representations[0]
    assert rep.component == "block_input" and torch.equal(rep.intervention.steering, fit.steering[1])
    # a length mismatch is an error unless asked to zero-extend
    short = {1: a2[1][:3]}
    with pytest.raises(ValueError, match="Right-pad"):
        fit_actadd(a1, short)
    padded = fit_actadd(a1, short, allow_length_mismatch=True)
    expected = a1[1].numpy().copy()
    expected[:3] -= short[1].numpy()
    np.testing.assert_allclose(padded.steering[1].numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(9)
    good = {0: rng.normal(size=(10, 8))}
    nan = {0: good[0].copy()}
    nan[0][3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_sea(good, nan, good)
    with pytest.raises(ValueError, match="NaN"):
        fit_caa(good, nan)
    with pytest.raises(ValueError, match="NaN"):
        fit_actadd(nan, good)
    with pytest.raises(ValueError, match="empty"):
        fit_caa({0: np.zeros((0, 8))}, {0: np.zeros((0, 8))})
    with pytest.raises(ValueError, match="no layers"):
        fit_caa({}, {})
    with pytest.raises(ValueError, match="rows"):
        fit_caa(good, {0: good[0][:9]})
    with pytest.raises(ValueError, match="width"):
        fit_sea(good, good, {0: good[0][:, :7]})
    with pytest.raises(ValueError, match="layers"):
        fit_caa(good, {1: good[0]})
    with pytest.raises(ValueError, match="2-D"):
        fit_caa({0: good[0][0]}, {0: good[0][0]})
    with pytest.raises(ValueError, match="energy_ratio"):
        fit_sea(good, good, good, energy_ratio=0.0)
    with pytest.raises(ValueError, match="feature function"):
        fit_sea(good, good, good, feature_function="cubic")
    with pytest.raises(ValueError, match="mapping|map layer"):
        fit_caa(good[0], good[0])
    with pytest.raises(ValueError, match="finite"):
        fit_actadd(good, good, coefficient=float("inf"))

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
