"""SEA: projectors from factors, both norm modes, feature maps and the closed-form fit."""

import numpy as np
import pytest
import torch

from actedit.interventions import SEAIntervention, fit_sea_factors
from actedit.interventions.sea import FeatureFunction, energy_rank, feature_map, inverse_feature_map


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
        energy = np.cumsum(s ** 2) / np.sum(s ** 2)
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
