"""HPR: the edit against an independent statement of the paper's Eq. 21, and its loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from actedit.interventions import HPRIntervention, hpr_parameter_count
from actedit.interventions.hpr import default_angle_widths


def make_hpr(d=16, seed=0, dtype=torch.float64, scale=None, **kwargs):
    """An HPR module with random trained weights; ``scale``: its input scale s (default ones)."""
    torch.manual_seed(seed)
    if kwargs.get("rotation_space") == "standardized":
        kwargs.setdefault("input_norm", "per_dimension")
    module = HPRIntervention(embed_dim=d, **kwargs)
    for name, p in module.named_parameters():
        if name not in module.fixed_parameters:
            torch.nn.init.normal_(p, std=0.4)
    if scale is not None:
        with torch.no_grad():
            module.input_scale.copy_(torch.as_tensor(scale))
            if bool(module.rotation_standardized):
                module.rotation_scale.copy_(torch.as_tensor(scale))
    return module.to(dtype)


LOPSIDED_SCALE = torch.tensor([3e4, 5e3, 1.0, 0.5] + [2.0] * 12, dtype=torch.float64)
"""An input scale like a large-norm model's: two massive dimensions, the rest of unit size."""

SCALINGS = {  # id: (input scale, rotation space)
    "unit-scale": (None, "raw"),
    "input-scale-raw": (LOPSIDED_SCALE, "raw"),
    "input-scale-standardized": (LOPSIDED_SCALE, "standardized"),
}


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


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_edit_equals_eq21_reference(scaling):
    """h′ = c ⊙ Eq21(h ⊘ c) about the normal w ⊙ c ⊘ s (c = 1: raw space; c = s: standardised);
    with s = c = 1 the released code's edit."""
    scale, space = SCALINGS[scaling]
    s = torch.ones(16, dtype=torch.float64) if scale is None else scale
    hpr = make_hpr(scale=s, rotation_space=space)
    c = s if space == "standardized" else torch.ones(16, dtype=torch.float64)
    h = torch.randn(64, 16, dtype=torch.float64) * s
    theta = math.pi * torch.sigmoid(hpr.angle_net(h / s).squeeze(-1))  # θ̂ = α·π·σ(f(h ⊘ s)), α = 1
    x, normal = h / c, hpr.probe.weight.detach().reshape(-1) * c / s
    expected = eq21_reference(x, normal, theta.detach())
    got = hpr(h.unsqueeze(0)).squeeze(0).detach() / c
    # Eq. 21 divides by sin θ', θ' = ∠ between x and its reflection: the float64 reference carries
    # an error of about 1e-16 / sin²θ', large where x lies near the hyperplane (rotating raw h with
    # massive dimensions, every x does). The two must agree to that precision.
    cos_xw = (x @ normal) / (x.norm(dim=-1) * normal.norm())
    sin_ref = 2 * cos_xw.abs() * (1 - cos_xw**2).sqrt()
    error = (got - expected).norm(dim=-1) / x.norm(dim=-1)
    assert float((error * sin_ref**2).max()) < 1e-14
    if scaling != "input-scale-raw":
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10)
    # both gates occur in the sample
    gates = hpr.probe_logits(h) > 0
    assert 0 < int(gates.sum()) < len(h)


def test_rotation_space_needs_the_input_scale():
    for norm in ("none", "rms"):
        with pytest.raises(ValueError, match=f"needs input_norm 'per_dimension'.*got input_norm '{norm}'"):
            HPRIntervention(embed_dim=8, input_norm=norm, rotation_space="standardized")
    with pytest.raises(ValueError, match="input_norm must be one of rms, per_dimension, none"):
        HPRIntervention(embed_dim=8, input_norm="layer")
    with pytest.raises(ValueError, match="rotation_space must be one of raw, standardized"):
        HPRIntervention(embed_dim=8, rotation_space="whitened")


def test_literal_eq21_mode_matches_stable_mode():
    stable = make_hpr(stable=True)
    literal = make_hpr(stable=False)
    literal.load_state_dict(stable.state_dict() | {"stable": torch.tensor(False)})
    h = torch.randn(32, 16, dtype=torch.float64)
    assert torch.allclose(stable(h[None]), literal(h[None]), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_norm_preserved_angle_is_theta_and_positives_untouched(scaling):
    """‖h′ ⊘ c‖ = ‖h ⊘ c‖ and ∠(h ⊘ c, h′ ⊘ c) = θ̂ (c = 1 in raw space, s standardised)."""
    scale, space = SCALINGS[scaling]
    s = torch.ones(16) if scale is None else scale.float()
    hpr = make_hpr(dtype=torch.float32, scale=s, rotation_space=space)
    c = s if space == "standardized" else torch.ones(16)
    h = torch.randn(2, 50, 16) * 3 * s
    out = hpr(h)
    x, x_out = (h / c).double(), (out / c).double()
    assert torch.allclose(x_out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    gates = hpr.probe_logits(h) > 0
    assert torch.equal(out[gates], h[gates])
    neg = ~gates
    angle = torch.arccos(F.cosine_similarity(x[neg], x_out[neg], dim=-1).clamp(-1, 1))
    tolerance = 2e-3 if scaling != "input-scale-raw" else 2e-2  # fp32 angles between near-parallel massive h
    assert torch.allclose(angle.float(), hpr.angle(h)[neg], atol=tolerance)


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


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_loss_matches_formula(scaling):
    scale, space = SCALINGS[scaling]
    s = torch.ones(16, dtype=torch.float64) if scale is None else scale
    c = s if space == "standardized" else torch.ones(16, dtype=torch.float64)
    hpr = make_hpr(dtype=torch.float64, scale=s, rotation_space=space)
    pos, neg = torch.randn(8, 16, dtype=torch.float64) * s, torch.randn(8, 16, dtype=torch.float64) * s
    w = hpr.probe.weight.reshape(-1)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(8), torch.zeros(8)]).double()
    p = torch.sigmoid((x / s) @ w)  # the probe reads h ⊘ s
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    target = torch.cat([pos, pos])
    cos = ((x / c) * (target / c)).sum(-1) / ((x / c).norm(dim=-1) * (target / c).norm(dim=-1))  # angles in h ⊘ c
    target_angle = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    predicted = math.pi * torch.sigmoid(hpr.angle_net(x / s).squeeze(-1))
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
        stacked = torch.stack([p.T if p.dim() == 2 else p for p in per_layer]).detach()
        out[name] = stacked.requires_grad_(name not in modules[0].fixed_parameters)
    return out


@pytest.mark.parametrize("method", ["loss", "probe_loss", "angle_loss"])
def test_stacked_losses_equal_each_layers_own_loss_and_gradients(method):
    """The all-layers form the trainer uses equals each module's loss, and so do the gradients."""
    scales = [torch.rand(12, dtype=torch.float64) * 10**s + 0.5 for s in range(3)]  # a different s per layer
    modules = [
        make_hpr(d=12, seed=s, angle_hidden_widths=(6, 3), scale=scales[s], rotation_space=space)
        for s, space in enumerate(["raw", "standardized", "raw"])
    ]
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


def gemma3_scale_model(dtype):
    """A tiny Gemma-3 with its own normalisation whose post-feed-forward norm weights make three
    massive dimensions: residual norms of thousands, as in Gemma-3 270M (see the issue's figures)."""
    from conftest import tiny_model

    model = tiny_model("gemma3")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight[:3] = torch.tensor([1500.0, -1200.0, 1000.0])
    return model.to(dtype)


def block_output_rows(model, ids, layer):
    captured = {}

    def keep(module, args, out):  # returns None: a forward hook's return value would replace the output
        captured["h"] = out[0] if isinstance(out, tuple) else out

    handle = model.model.layers[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured["h"].reshape(-1, captured["h"].shape[-1]).float()


@pytest.mark.parametrize("space", ["raw", "standardized"])  # raw with the default input_norm rms
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trained_hpr_rotates_negatives_by_the_predicted_angle_on_a_gemma3_scale_model(dtype, space):
    from actedit.data.store import PairedActivations
    from actedit.interventions import build_hpr_config, intervenable
    from actedit.train.trainer import TrainSettings, new_interventions, train_top_layers

    model = gemma3_scale_model(dtype)
    g = torch.Generator().manual_seed(0)
    rows = block_output_rows(model, torch.randint(3, 97, (64, 16), generator=g), 1)
    assert float(rows.norm(dim=-1).mean()) > 1e3  # the scale the recipe failed on
    half = len(rows) // 2
    pairs = PairedActivations({1: rows[:half]}, {1: rows[half:]})
    norm = "per_dimension" if space == "standardized" else "rms"
    modules = new_interventions("hpr", rows.shape[-1], [1], seed=0, input_norm=norm, rotation_space=space)
    result, _ = train_top_layers(modules, pairs, pairs, k=1, config=TrainSettings(epochs=3, progress=False))
    module = result.modules[1]
    seen = {}
    pvm = intervenable(model, build_hpr_config(model, [1], modules={1: module}))
    module.effect_recorder = lambda m, h, out, mask: seen.update(h=h.detach().clone(), out=out.detach().clone())
    try:
        with torch.no_grad():
            pvm({"input_ids": torch.randint(3, 97, (4, 16), generator=g)}, unit_locations=None, use_cache=False)
    finally:
        module.effect_recorder = None
    h = seen["h"].reshape(-1, rows.shape[-1]).double()
    out = seen["out"].reshape(-1, rows.shape[-1]).double()
    with torch.no_grad():
        negative = module.probe_logits(h.float()) <= 0
        theta = module.angle(h.float()).double()
    assert 0 < int(negative.sum()) < len(h)
    assert torch.equal(out[~negative], h[~negative])  # positives untouched
    assert float(theta[negative].mean()) > 1e-3  # not a no-op
    scale = module.rotation_scale.detach().double()
    assert torch.equal(
        scale, module.input_scale.detach().double() if space == "standardized" else torch.ones_like(scale)
    )
    x, x_out = h / scale, out / scale  # the rotation space: h itself or h̃
    turned = torch.arccos(F.cosine_similarity(x[negative], x_out[negative], dim=-1).clamp(-1, 1))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 rounds each element of h′ to 8 bits
    assert torch.allclose(turned, theta[negative], atol=tolerance, rtol=0)
    assert torch.allclose(x_out[negative].norm(dim=-1), x[negative].norm(dim=-1), rtol=tolerance)
    # towards the reflection about the probe's hyperplane (normal w ⊙ c ⊘ s in these coordinates)
    w = module.probe.weight.detach().reshape(-1).double() * scale / module.input_scale.detach().double()
    assert bool(((x_out[negative] - x[negative]) @ w > 0).all())


@pytest.mark.parametrize("norm", ["rms", "per_dimension", "none"])
def test_prepare_sets_the_input_scale_from_the_training_activations(norm):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.tensor([3e4, 1.0, 2.0, 5.0, 1, 1, 1, 1.0])
    module = HPRIntervention(embed_dim=8, input_norm=norm).double()
    module.prepare(h)
    expected = {
        "rms": h.square().mean().sqrt().expand(8),
        "per_dimension": h.square().mean(0).sqrt(),
        "none": torch.ones(8, dtype=torch.float64),
    }[norm]
    assert torch.allclose(module.input_scale.detach(), expected, rtol=1e-12, atol=0)
    assert torch.equal(module.rotation_scale.detach(), torch.ones(8, dtype=torch.float64))
    if norm != "none":  # "none" reads nothing
        with pytest.raises(ValueError, match="NaN or infinite"):
            module.prepare(torch.full((4, 8), float("nan"), dtype=torch.float64))


def test_a_scalar_input_scale_changes_no_geometry():
    """With s = σ·1 the edit is the released code's edit (s = 1) whose probe and first angle-net
    layer read h/σ: the same hyperplane, angles and rotation of h itself."""
    sigma = 7.5e3
    scaled = make_hpr(scale=torch.full((16,), sigma, dtype=torch.float64))
    released = make_hpr(input_norm="none")
    with torch.no_grad():
        released.probe.weight.copy_(scaled.probe.weight / sigma)
        released.angle_net.load_state_dict(scaled.angle_net.state_dict())
        released.angle_net[0].weight.div_(sigma)
    h = torch.randn(2, 9, 16, dtype=torch.float64) * sigma
    assert 0 < int(scaled.gate(h).sum()) < h.shape[0] * h.shape[1]
    mask = torch.ones(2, 9, dtype=torch.bool)
    assert torch.allclose(scaled.edit(h, mask), released.edit(h, mask), rtol=1e-10, atol=0)


def reflection_reference(h, w):
    """−AnglePred as the paper states it: s·h + (1 − s)·(h − 2 (wᵀh / ‖w‖²) w), one vector at a time."""
    out = []
    for x in h.double():
        s = 1.0 if float(x @ w) > 0 else 0.0
        out.append(s * x + (1 - s) * (x - 2 * float(x @ w) / float(w @ w) * w))
    return torch.stack(out)


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_without_angle_prediction_negatives_are_reflected(scaling):
    """−AnglePred (Table 1's ablation): h′ = c ⊙ reflection of h ⊘ c about the normal w ⊙ c ⊘ s;
    the same edit as turning by the full angle θ′ to the reflection; norms kept; θ̂ unused."""
    scale, space = SCALINGS[scaling]
    s = torch.ones(16, dtype=torch.float64) if scale is None else scale
    hpr = make_hpr(scale=s, rotation_space=space, angle_prediction=False)
    c = s if space == "standardized" else torch.ones(16, dtype=torch.float64)
    h = torch.randn(64, 16, dtype=torch.float64) * s
    normal = hpr.probe.weight.detach().reshape(-1) * c / s
    got = hpr(h.unsqueeze(0)).squeeze(0).detach()
    assert torch.allclose(got / c, reflection_reference(h / c, normal), rtol=1e-12, atol=1e-9)
    assert torch.allclose((got / c).norm(dim=-1), (h / c).norm(dim=-1), rtol=1e-12)
    negative = hpr.probe_logits(h) <= 0
    assert 0 < int(negative.sum()) < len(h)
    assert torch.equal(got[~negative], h[~negative])
    with torch.no_grad():
        hpr.angle_net[0].weight.mul_(3.0)  # the angle network does not enter
    assert torch.equal(hpr(h.unsqueeze(0)).squeeze(0), got)
    with torch.no_grad():
        hpr.angle_prediction.fill_(True)
    assert not torch.allclose(hpr(h.unsqueeze(0)).squeeze(0)[negative], got[negative])


def test_angle_prediction_is_a_setting_saved_with_the_edit():
    from actedit.interventions.hpr import HPRSettings, build_hpr_config
    from conftest import tiny_model

    assert HPRSettings(angle_prediction=False).intervention_arguments()["angle_prediction"] is False
    with pytest.raises(ValueError, match="HPR angle_prediction must be true or false, got 'no'"):
        HPRSettings(angle_prediction="no")
    trained = make_hpr(d=32, dtype=torch.float32)
    config = build_hpr_config(tiny_model("llama"), [1], modules={1: trained}, angle_prediction=False)
    assert not bool(trained.angle_prediction)
    assert config.representations[0].intervention is trained
    fresh = HPRIntervention(embed_dim=32)
    fresh.load_state_dict(trained.state_dict())
    assert not bool(fresh.angle_prediction)
    legacy = {k: v for k, v in trained.state_dict().items() if k != "angle_prediction"}
    fresh.load_state_dict(legacy)  # artifacts saved before the setting rotate, as they did
    assert bool(fresh.angle_prediction)


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16-activations"])
def test_frozen_edit_equals_the_edit(scaling, dtype):
    """The fast path generation runs (probe and first angle layer in one product, the rotation's
    scalars folded) gives :meth:`edit`'s output to float rounding: both gates, α ≠ 1, every
    input and rotation scale; bf16 activations are edited in the module's fp32."""
    scale, space = SCALINGS[scaling]
    s = torch.ones(16) if scale is None else scale
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hpr = make_hpr(dtype=module_dtype, scale=s, rotation_space=space, alpha=0.7)
    h = (torch.randn(3, 40, 16, dtype=torch.float64) * 2 * s).to(dtype)
    with torch.no_grad():
        reference = hpr(h)
        with hpr.frozen():
            fast = hpr(h)
        assert hpr.__dict__.get("_frozen_plan") is None
        assert hpr.frozen_edit() != hpr.edit  # the fast path, not the reference again
        gates = hpr.probe_logits(h.to(module_dtype)) > 0
    assert 0 < int(gates.sum()) < gates.numel()
    assert fast.dtype == dtype and torch.equal(fast[gates], h[gates])
    error = (fast.double() - reference.double()).norm(dim=-1) / h.double().norm(dim=-1)
    tolerance = {torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]  # bf16: one rounding of the output
    assert float(error.max()) < tolerance
    if dtype == torch.bfloat16:  # mostly the very same bf16 values
        assert float((fast != reference).any(-1).float().mean()) < 0.25


@pytest.mark.parametrize("settings", [{"stable": False}, {"angle_prediction": False}])
def test_frozen_edit_of_other_settings_is_the_edit(settings):
    hpr = make_hpr(**settings)
    assert hpr.frozen_edit() == hpr.edit
