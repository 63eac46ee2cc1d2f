"""SEA: projectors from factors, both norm modes, feature maps, and the closed-form fit (one layer and
several) against an independent numpy SVD, with its bad inputs."""

import numpy as np
import pytest
import torch
from test_caa import activations_with_a_nan

from actedit.interventions import SEAIntervention, fit_sea_factors
from actedit.interventions.sea import (
    FeatureFunction,
    SEAFactors,
    energy_rank,
    feature_map,
    fit_sea,
    inverse_feature_map,
)
from conftest import tiny_model


def orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q[:, :k]


def make_sea(d=12, kp=3, kn=4, **kwargs):
    u = orthonormal(d, kp + kn)
    return SEAIntervention(embed_dim=d, U_pos=u[:, :kp], U_neg=u[:, kp:], **kwargs).double()


def test_projectors_equal_factor_products():
    sea = make_sea()
    p_pos, p_neg = sea.projectors()
    assert torch.allclose(p_pos, sea.U_pos @ sea.U_pos.T)
    assert torch.allclose(p_neg, torch.eye(12, dtype=torch.float64) - sea.U_neg @ sea.U_neg.T)
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.allclose(sea.project(x), x @ p_pos.T + x @ p_neg.T)
    assert sea.ranks == (3, 4)
    # only the factors are stored, never d x d matrices
    assert all(t.numel() <= 12 * 4 for n, t in sea.state_dict().items() if n.startswith("U_"))


def test_token_norm_mode():
    sea = make_sea(norm_mode="token")
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    p_pos, p_neg = sea.projectors()
    z = x @ p_pos.T + x @ p_neg.T
    expected = z * x.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True)
    assert torch.allclose(sea(x), expected)
    assert torch.allclose(sea(x).norm(dim=-1), x.norm(dim=-1))


def test_feature_norm_mode_per_row_across_tokens():
    sea = make_sea(norm_mode="feature")
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    p_pos, p_neg = sea.projectors()
    out = sea(x)
    for b in range(2):  # the official code: one sequence, per feature across its tokens
        z = x[b] @ p_pos.T + x[b] @ p_neg.T
        zn = z.numpy()
        expected = zn * (np.linalg.norm(x[b].numpy(), axis=0) / np.linalg.norm(zn, axis=0))
        assert torch.allclose(out[b], torch.as_tensor(expected))


@pytest.mark.parametrize("fn", ["squared_exponential", "tanh", "elu"])
def test_feature_function_inverse(fn):
    f = FeatureFunction.parse(fn)
    x = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    if f == FeatureFunction.SQUARED_EXPONENTIAL:
        x = x[x.abs() > 1e-3]
    back = inverse_feature_map(feature_map(x, f), f, reference=x)
    assert torch.allclose(back, x, atol=1e-6)


def test_nonlinear_sea_with_zero_rank_is_identity():
    sea = SEAIntervention(embed_dim=8, feature_function="tanh").double()
    x = torch.randn(1, 4, 8, dtype=torch.float64) * 0.5
    assert torch.allclose(sea(x), x, atol=1e-9)


def test_fit_factors_match_numpy_svd():
    rng = np.random.default_rng(0)
    n, d = 40, 10
    H, Hp, Hn = (rng.normal(size=(n, d)) for _ in range(3))
    U_pos, U_neg = fit_sea_factors(torch.tensor(H), torch.tensor(Hp), torch.tensor(Hn), energy_ratio=0.9)
    for U, other in ((U_pos, Hp), (U_neg, Hn)):
        omega = H.T @ other / n
        u, s, _ = np.linalg.svd(omega)
        energy = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(energy >= 0.9)) + 1
        assert U.shape == (d, k)
        # singular vectors are defined up to sign: compare the projectors
        assert np.allclose(U.double().numpy() @ U.double().numpy().T, u[:, :k] @ u[:, :k].T, atol=1e-5)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        fit_sea_factors(torch.full((3, 4), float("nan")), torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        fit_sea_factors(torch.ones(0, 4), torch.ones(0, 4), torch.ones(0, 4))
    with pytest.raises(ValueError, match="shape"):
        SEAIntervention(embed_dim=8, U_pos=torch.zeros(7, 2))
    with pytest.raises(ValueError, match="feature function"):
        SEAIntervention(embed_dim=8, feature_function="relu")
    with pytest.raises(ValueError, match="norm mode"):
        SEAIntervention(embed_dim=8, norm_mode="global")


def test_factors_resize_on_load():
    sea = make_sea().float()
    fresh = SEAIntervention(embed_dim=12)
    fresh.load_state_dict(sea.state_dict())
    x = torch.randn(1, 3, 12)
    assert fresh.ranks == (3, 4) and torch.equal(fresh(x), sea(x))


# ------------------------------------------------------------------ fit_sea (several layers)
def low_rank_acts(n, d, seed, layers=(0, 2)):
    """Activations with a decaying spectrum (so the energy ratio cuts below full rank)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        mix = rng.normal(size=(d, d)) * (0.6 ** np.arange(d))[:, None]
        out[layer] = rng.normal(size=(n, d)) @ mix + 0.01 * rng.normal(size=(n, d))
    return out


def numpy_sea(H, Hp, phi, ratio):
    """Independent SEA: U of SVD(φ(H)ᵀφ(H±)/N) truncated where cumulative energy reaches ratio."""
    omega = phi(H).T @ phi(Hp) / H.shape[0]
    U, S, _ = np.linalg.svd(omega)
    energy = np.cumsum(S**2) / np.sum(S**2)
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


def test_fit_sea_bad_inputs_raise_clear_errors():
    good, nan = activations_with_a_nan()
    with pytest.raises(ValueError, match="NaN"):
        fit_sea(good, nan, good)
    with pytest.raises(ValueError, match="width"):
        fit_sea(good, good, {0: good[0][:, :7]})
    with pytest.raises(ValueError, match="energy_ratio"):
        fit_sea(good, good, good, energy_ratio=0.0)
    with pytest.raises(ValueError, match="feature function"):
        fit_sea(good, good, good, feature_function="cubic")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_frozen_edit_equals_the_edit(dtype):
    """The fast path generation runs (both projections in one product pair) gives :meth:`edit`'s
    output to float rounding, norms kept; a zero activation stays zero."""
    sea = make_sea().to(torch.float32 if dtype != torch.float64 else torch.float64)
    x = torch.randn(2, 6, 12, dtype=torch.float64).to(dtype)
    x[0, 0] = 0
    with torch.no_grad():
        reference = sea(x)
        with sea.frozen():
            fast = sea(x)
    assert sea.frozen_edit() != sea.edit and fast.dtype == dtype
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(fast.double(), reference.double(), rtol=tolerance, atol=tolerance)
    assert torch.allclose(fast.double().norm(dim=-1), x.double().norm(dim=-1), rtol=tolerance)
    assert torch.equal(fast[0, 0], x[0, 0])


@pytest.mark.parametrize("settings", [{"norm_mode": "feature"}, {"feature_function": "tanh"}])
def test_frozen_edit_of_other_settings_is_the_edit(settings):
    sea = make_sea(**settings)
    assert sea.frozen_edit() == sea.edit
