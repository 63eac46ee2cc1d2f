"""HPR: the edit against an independent statement of the paper's Eq. 21, and its loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from actedit.interventions import HPRIntervention, hpr_parameter_count
from actedit.interventions.hpr import default_angle_widths


def make_hpr(d=16, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    module = HPRIntervention(embed_dim=d, **kwargs)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return module.to(dtype)


def eq21_reference(h, w, theta):
    """Eq. 21 written out, one vector at a time, in float64."""
    out = []
    for x, t in zip(h.double(), theta.double(), strict=True):
        wd = w.double()
        if float(x @ wd) > 0:  # s = round(sigmoid(w.x)) = 1: positive, unchanged
            out.append(x)
            continue
        reflected = x - 2 * (x @ wd) / (wd @ wd) * wd
        cos = float(x @ reflected / (x.norm() * reflected.norm()))
        theta_ref = math.acos(max(-1 + 1e-15, min(1 - 1e-15, cos)))
        beta1 = math.sin(float(t)) / math.sin(theta_ref)
        beta2 = math.sin(theta_ref - float(t)) / math.sin(theta_ref)
        out.append(beta1 * reflected + beta2 * x)
    return torch.stack(out)


def test_edit_equals_eq21_reference():
    hpr = make_hpr()
    h = torch.randn(64, 16, dtype=torch.float64)
    theta = hpr.angle(h)
    expected = eq21_reference(h, hpr.probe.weight.detach().reshape(-1), theta.detach())
    got = hpr(h.unsqueeze(0)).squeeze(0)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10)
    # both gates occur in the sample
    gates = hpr.probe_logits(h) > 0
    assert 0 < int(gates.sum()) < len(h)


def test_literal_eq21_mode_matches_stable_mode():
    stable = make_hpr(stable=True)
    literal = make_hpr(stable=False)
    literal.load_state_dict(stable.state_dict() | {"stable": torch.tensor(False)})
    h = torch.randn(32, 16, dtype=torch.float64)
    assert torch.allclose(stable(h[None]), literal(h[None]), rtol=1e-7, atol=1e-8)


def test_norm_preserved_angle_is_theta_and_positives_untouched():
    hpr = make_hpr(dtype=torch.float32)
    h = torch.randn(2, 50, 16) * 3
    out = hpr(h)
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5)
    gates = hpr.probe_logits(h) > 0
    assert torch.equal(out[gates], h[gates])
    neg = ~gates
    angle = torch.arccos(F.cosine_similarity(h[neg].double(), out[neg].double(), dim=-1).clamp(-1, 1))
    assert torch.allclose(angle.float(), hpr.angle(h)[neg], atol=2e-3)


def test_rotation_moves_towards_positive_side():
    """The rotation turns a negative h towards its reflection, i.e. across the hyperplane."""
    hpr = make_hpr(dtype=torch.float64)
    with torch.no_grad():  # make θ̂ ≈ π: the output is close to the reflection
        hpr.angle_net[-1].bias.fill_(20.0)
    h = torch.randn(100, 16, dtype=torch.float64)
    neg = hpr.probe_logits(h) <= 0
    out = hpr(h[None])[0]
    assert bool((hpr.probe_logits(out[neg]) > 0).all())


def test_alpha_scales_angle():
    hpr = make_hpr(alpha=0.5)
    h = torch.randn(10, 16, dtype=torch.float64)
    assert torch.allclose(hpr.angle(h), 0.5 * hpr.raw_angle(h))
    assert float(hpr.alpha) == 0.5


def test_low_precision_output_keeps_dtype():
    hpr = make_hpr(dtype=torch.float32)
    h = torch.randn(1, 5, 16, dtype=torch.bfloat16)
    out = hpr(h)
    assert out.dtype == torch.bfloat16


def test_loss_matches_formula():
    hpr = make_hpr(dtype=torch.float64)
    pos, neg = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    w = hpr.probe.weight.reshape(-1)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(8), torch.zeros(8)]).double()
    p = torch.sigmoid(x @ w)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    target = torch.cat([pos, pos])
    cos = (x * target).sum(-1) / (x.norm(dim=-1) * target.norm(dim=-1))
    target_angle = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    predicted = math.pi * torch.sigmoid(hpr.angle_net(x).squeeze(-1))
    mse = ((predicted - target_angle) ** 2).mean()
    assert torch.allclose(hpr.loss(pos, neg), bce + mse, rtol=1e-10)


def test_loss_rejects_mismatched_pairs():
    hpr = make_hpr()
    with pytest.raises(ValueError, match="same shape"):
        hpr.loss(torch.randn(3, 16), torch.randn(4, 16))


def test_default_architecture_and_parameter_count():
    hpr = HPRIntervention(embed_dim=64)
    assert hpr.probe.bias is None and tuple(hpr.probe.weight.shape) == (1, 64)
    widths = [m.out_features for m in hpr.angle_net if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 16, 8, 1] and default_angle_widths(64) == (32, 16, 8)
    assert sum(isinstance(m, torch.nn.GELU) for m in hpr.angle_net) == 3
    assert hpr.num_parameters == hpr_parameter_count(64)
    # the paper's module at d = 4096 has about 11 M parameters
    assert 10.9e6 < hpr_parameter_count(4096) < 11.1e6


def test_custom_widths_survive_state_dict_roundtrip():
    trained = make_hpr(d=16, angle_hidden_widths=(5, 3), dtype=torch.float32)
    fresh = HPRIntervention(embed_dim=16)  # what pyvene builds on load: default widths
    fresh.load_state_dict(trained.state_dict())
    h = torch.randn(1, 7, 16)
    assert torch.equal(fresh(h), trained(h))


def test_wrong_width_is_rejected():
    hpr = make_hpr(d=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="width 16"):
        hpr(torch.randn(1, 3, 8))
    other = HPRIntervention(embed_dim=8)
    with pytest.raises(ValueError, match="width 16"):
        other.load_state_dict(hpr.state_dict())


def test_bad_widths_rejected():
    with pytest.raises(ValueError, match="positive"):
        HPRIntervention(embed_dim=8, angle_hidden_widths=(4, 0))


def _stack(modules):
    """Stacked weights in the trainer's layout: leading layer axis, matrices (L, in, out)."""
    out = {}
    for name, _ in modules[0].named_parameters():
        per_layer = [dict(m.named_parameters())[name] for m in modules]
        out[name] = torch.stack([p.T if p.dim() == 2 else p for p in per_layer]).detach().requires_grad_(True)
    return out


@pytest.mark.parametrize("method", ["loss", "probe_loss", "angle_loss"])
def test_stacked_losses_equal_each_layers_own_loss_and_gradients(method):
    """The all-layers form the trainer uses equals each module's loss, and so do the gradients."""
    modules = [make_hpr(d=12, seed=s, angle_hidden_widths=(6, 3)) for s in range(3)]
    hp, hn = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 12, dtype=torch.float64)
    stacked = _stack(modules)
    got = getattr(HPRIntervention, f"stacked_{method}")(stacked, hp, hn)
    got.sum().backward()
    for layer, module in enumerate(modules):
        expected = getattr(module, method)(hp[layer], hn[layer])
        expected.backward()
        assert torch.allclose(got[layer], expected, atol=1e-12, rtol=0)
        for name, p in module.named_parameters():
            if p.grad is None:  # the other term's parameters get no gradient
                assert stacked[name].grad is None, name
            else:
                grad = stacked[name].grad[layer]
                assert torch.allclose(grad.T if p.dim() == 2 else grad, p.grad, atol=1e-12, rtol=0), name
    logits = HPRIntervention.stacked_probe_logits(stacked, hp)
    for layer, module in enumerate(modules):
        assert torch.allclose(logits[layer], module.probe_logits(hp[layer]), atol=1e-12, rtol=0)
