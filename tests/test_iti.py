"""ITI: only the selected heads' slices move, by exactly alpha * sigma * direction."""

import numpy as np
import pytest
import torch

from actedit.interventions import ITIIntervention, mass_mean_directions


def make_iti(alpha=15.0):
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    sigmas = torch.rand(4) + 0.5
    return ITIIntervention(embed_dim=32, num_heads=4, directions=directions, sigmas=sigmas, heads=[1, 3],
                           alpha=alpha, position_policy="all"), directions, sigmas


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
        a = acts[:, h * 8:(h + 1) * 8]
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
