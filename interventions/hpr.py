"""HPR — Householder Pseudo-Rotation (Pham & Nguyen, EMNLP 2024; VinAIResearch/HPR).

For an activation h ∈ R^d at the residual stream after decoder layer k (``block_output``):

* probe (no bias): s = round(σ(wᵀh)); s = 1 marks a *positive* activation, kept as is;
* reflection about the probe hyperplane (Householder): h' = h − 2 (wᵀh / ‖w‖²) w (w is not
  normalised);
* θ' = ∠(h, h'), θ̂ = α · π · σ(f(h)) with f the angle network (paper: 4 linear layers
  d → d/2 → d/4 → d/8 → 1 with GELU between);
* pseudo-rotation (paper Eq. 21): h_rot = sin θ̂ / sin θ' · h' + sin(θ' − θ̂) / sin θ' · h, which
  turns h by exactly θ̂ towards h' in the plane of h and h', keeping ‖h_rot‖ = ‖h‖;
* output: s · h + (1 − s) · h_rot.
* −AnglePred (the ablation row of the paper's Table 1; ``angle_prediction=False``): no angle
  network at inference, a negative h is replaced by its reflection h' itself, s · h + (1 − s) · h'.

Numerics: Eq. 21 as written divides by sin θ', which is ill-conditioned in fp32 when h lies close
to the hyperplane (errors of 1e-2 relative were measured). The default computation
(``stable=True``) evaluates the same rotation in an orthonormal basis of that plane:
u = h/‖h‖, v = −sign(wᵀh) · (w − (wᵀu)u)/‖w − (wᵀu)u‖ (the direction in which the reflection moves
h), h_rot = ‖h‖ (cos θ̂ u + sin θ̂ v). ``stable=False`` evaluates Eq. 21 literally, with cos θ'
clipped to ±(1 − 1e-7) as in the official code.

Training loss (per layer, batch of pairs; X = [h⁺; h⁻], targets T = [h⁺; h⁺], labels [1; 0]):
BCE(σ(wᵀX), y) + MSE(θ̂(X), arccos(clip(cos(X, T)))), see :meth:`HPRIntervention.loss` (with
the input scale below, the probe and f read h̃).

Input scale (``input_norm``; not in the released code). The probe and the angle network read
h̃ = h ⊘ s, with s a fixed parameter ``input_scale`` saved with the edit. ``"rms"`` (default):
s = σ·1, σ the root mean square of every coordinate of the layer's training activations; a scalar
changes no geometry (the probe's hyperplane wᵀh̃ = 0 is (w/σ)ᵀh = 0 in h's space, and angles are
scale-free), only the size of what the optimiser sees. Models whose residual stream has norms of
10³–10⁵ (Gemma-3) otherwise give AdamW steps that move wᵀh by hundreds and angle-network logits
of −30 to −500: θ̂ ≈ 0, a no-op edit. ``"per_dimension"``: s is each dimension's own RMS, so a
few massive dimensions no longer dominate h̃; the probe's normal in h's space is then w ⊘ s.
``"none"``: s = 1, the released code.

Rotation space (``rotation_space``). ``"raw"`` (default): the target angles are ∠(h⁻, h⁺) and
the rotation turns h itself towards its reflection about the probe's hyperplane (normal w ⊘ s),
keeping ‖h‖: the paper's edit. ``"standardized"`` (needs ``input_norm: per_dimension``): both
live in h̃ (targets ∠(h̃⁻, h̃⁺); h′ = s ⊙ R_θ̂(h̃), keeping ‖h̃‖). With a per-dimension s, a raw
turn by θ̂ moves ‖h‖·sin θ̂ along w ⊘ s, which points into the dimensions of small scale and
breaks a model like Gemma-3; in h̃ each dimension moves in proportion to its own scale. Both are
exact rotations in their space; the fixed parameter ``rotation_scale`` c (1 or s) records the
choice: the edit is c ⊙ R_θ̂(h ⊘ c) with the hyperplane's normal w ⊙ c ⊘ s, and the targets are
∠(h⁻ ⊘ c, h⁺ ⊘ c).
Both choices are listed in README ("Choices where the seeds disagree").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pyvene as pv
import torch
import torch.nn.functional as F
from torch import nn

from .base import ActEditIntervention
from .checks import check_number
from .edits import edit_config, site_width
from .positions import PolicyLike, PositionPolicy
from .registry import LossTerm, MethodSpec, TrainedMethodSettings, TrainingRecipe, register_method
from .settings import keyword_checked

COS_CLIP = 1.0 - 1e-7
INPUT_NORMS = ("rms", "per_dimension", "none")
"""HPR's ``input_norm`` values: the probe and angle network read h divided by the training
activations' RMS (default), by each dimension's own RMS, or h itself (the released code)."""
ROTATION_SPACES = ("raw", "standardized")
"""HPR's ``rotation_space`` values: target angles and rotation in h (default) or in h ⊘ RMS."""


@dataclass
class HPRSettings(TrainedMethodSettings):
    """HPR's settings (a study's ``methods.hpr.settings`` block; its optimiser is ``methods.hpr.train``).

    Attributes:
        layers: the layers a module is trained for (default all; the paper trains every layer).
        top_layers: layers enabled, the best by eval probe accuracy (the HPR README's k; its example: 5).
        strategy: ``probe_first`` (default: every layer's probe, then the angle nets of the
            selected layers only; the same modules as joint training with each loss term clipped
            on its own) or ``joint`` (probe and angle net of every layer together, then selection).
        alpha: scale α of the predicted angle θ̂ at inference (the paper's setting: 1).
        angle_hidden_widths: hidden widths of the angle network; None: the paper's d/2, d/4, d/8.
        stable: evaluate the rotation in an orthonormal basis (default) or literally as Eq. 21.
        angle_prediction: rotate by the angle network's θ̂ (default, HPR); false: −AnglePred, the
            ablation of Table 1, which replaces a negative h by its Householder reflection.
        position_policy: positions edited; ``all`` reproduces the published numbers (every
            position of the scored sequence), the official demo generates with ``last``.
        input_norm: ``rms`` (default): the probe and the angle network read h divided by the
            RMS of the training activations, one number per layer (see the module docstring);
            ``per_dimension``: by each dimension's RMS; ``none``: h itself (the released code).
        rotation_space: ``raw`` (default): target angles and rotation in h, the paper's edit;
            ``standardized``: in h ⊘ s (for models with massive dimensions, e.g. Gemma-3;
            needs ``input_norm: per_dimension``).
    """

    INFERENCE_ONLY = ("alpha", "stable", "angle_prediction", "position_policy")

    alpha: float = 1.0
    angle_hidden_widths: Optional[List[int]] = None
    stable: bool = True
    angle_prediction: bool = True
    position_policy: str = "all"
    input_norm: str = "rms"
    rotation_space: str = "raw"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = check_number(self.alpha, "HPR alpha")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"HPR input_norm must be one of {', '.join(INPUT_NORMS)}, got {self.input_norm!r}.")
        _check_rotation_space(self.rotation_space, self.input_norm)
        if self.angle_hidden_widths is not None:
            widths = list(self.angle_hidden_widths)
            if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
                raise ValueError(f"HPR angle_hidden_widths must be a list of positive integers, got {widths!r}.")
            self.angle_hidden_widths = widths
        for key in ("stable", "angle_prediction"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"HPR {key} must be true or false, got {getattr(self, key)!r}.")

    def intervention_arguments(self) -> Dict[str, Any]:
        """The :class:`HPRIntervention` constructor's arguments these settings give."""
        return {
            "alpha": self.alpha,
            "angle_hidden_widths": self.angle_hidden_widths,
            "stable": self.stable,
            "angle_prediction": self.angle_prediction,
            "position_policy": self.position_policy,
            "input_norm": self.input_norm,
            "rotation_space": self.rotation_space,
        }


def default_angle_widths(d: int) -> Tuple[int, int, int]:
    """The paper's hidden widths of the angle network: d/2, d/4, d/8."""
    return (max(d // 2, 1), max(d // 4, 1), max(d // 8, 1))


def _stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (L, n, in) times weight (L, in, out) plus bias (L, out), per layer. A single output
    column is computed as a multiply-and-sum, which torch's CPU ``bmm`` is slow at for one column
    (``benchmarks/bench_hpr_train.py`` measures the training step)."""
    if weight.shape[-1] == 1:
        out = (x * weight.transpose(-1, -2)).sum(-1, keepdim=True)
        return out if bias is None else out + bias.unsqueeze(1)
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


def _check_rotation_space(rotation_space: str, input_norm: str) -> None:
    if rotation_space not in ROTATION_SPACES:
        raise ValueError(f"HPR rotation_space must be one of {', '.join(ROTATION_SPACES)}, got {rotation_space!r}.")
    if rotation_space == "standardized" and input_norm != "per_dimension":
        raise ValueError(
            "HPR rotation_space 'standardized' needs input_norm 'per_dimension' (it rotates h ⊘ s, s the "
            f"per-dimension RMS), got input_norm {input_norm!r}."
        )


def _stacked_scaled(weights: Mapping[str, torch.Tensor], h: torch.Tensor, name: str = "input_scale") -> torch.Tensor:
    """h ⊘ sₗ per layer (h (L, n, d), sₗ the stacked fixed parameter ``name`` (L, d)); h when absent."""
    scale = weights.get(name)
    return h if scale is None else h / scale.unsqueeze(1)


def _householder(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """x − 2 (wᵀx / ‖w‖²) w: the reflection of x about the hyperplane wᵀx = 0 (``wx`` = x @ w)."""
    return x - (2 * wx / (w @ w)).unsqueeze(-1) * w


def _scaled_back(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """c ⊙ x, back from the rotation space (x itself when c = 1: ``scale`` None)."""
    return x if scale is None else x * scale


def _angle_net(d: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    width = d
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.GELU()]
        width = int(h)
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class HPRIntervention(ActEditIntervention):
    """Householder Pseudo-Rotation at ``block_output``; see the module docstring for the math.

    Args:
        embed_dim: hidden size d.
        alpha: scale α of the predicted angle (default 1, the paper's setting).
        angle_hidden_widths: hidden widths of the angle network; default (d/2, d/4, d/8).
        stable: evaluate the rotation in an orthonormal basis (default) or literally as Eq. 21.
        angle_prediction: true (default): rotate by θ̂; false: −AnglePred, reflect (the angle
            network is trained and saved all the same, and not used).
        position_policy: default ``all`` (the published numbers edit every position);
            the official demo generates with ``last``.
        input_norm: ``rms`` (default): :meth:`prepare` sets ``input_scale`` to the RMS of the
            training activations (one number); ``per_dimension``: to each dimension's RMS;
            ``none``: it stays 1 (the released code).
        rotation_space: ``raw`` (default; ``rotation_scale`` stays 1) or ``standardized``
            (:meth:`prepare` sets ``rotation_scale`` to ``input_scale``).

    Public state (artifact format): ``probe`` (``nn.Linear(d, 1, bias=False)``), ``angle_net``
    (logits; θ̂ = α·π·σ(angle_net(h ⊘ s))), the fixed parameters ``input_scale`` s and
    ``rotation_scale`` c (d,) (ones in artifacts saved before they existed), buffers ``alpha``,
    ``angle_widths``, ``stable``, ``angle_prediction``, ``input_norm`` (index into
    :data:`INPUT_NORMS`), ``rotation_standardized``.
    """

    default_policy = PositionPolicy.ALL
    method_name = "hpr"
    training_recipe = TrainingRecipe(
        terms=(
            LossTerm("probe_loss", trains="probe", shows=("probe_accuracy",)),
            LossTerm("angle_loss", trains="angle_net"),
        ),
        selection="probe_accuracy",
    )
    """The loss terms (:meth:`loss` is their sum; disjoint parameters, so
    :mod:`actedit.train.trainer` trains them one after the other): the probe first on every layer,
    then the layers with the best eval :meth:`probe_logits` accuracy train their angle nets."""
    fixed_parameters = ("input_scale", "rotation_scale")

    alpha: torch.Tensor
    angle_widths: torch.Tensor
    stable: torch.Tensor
    angle_prediction: torch.Tensor
    input_norm: torch.Tensor
    rotation_standardized: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        alpha: float = 1.0,
        angle_hidden_widths: Optional[Sequence[int]] = None,
        stable: bool = True,
        input_norm: str = "rms",
        rotation_space: str = "raw",
        angle_prediction: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}.")
        _check_rotation_space(rotation_space, input_norm)
        d = self.d
        widths = tuple(angle_hidden_widths) if angle_hidden_widths is not None else default_angle_widths(d)
        if any(int(w) <= 0 for w in widths):
            raise ValueError(f"angle_hidden_widths must be positive integers, got {widths}.")
        self.probe = nn.Linear(d, 1, bias=False)
        self.angle_net = _angle_net(d, widths)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("angle_widths", torch.tensor([int(w) for w in widths], dtype=torch.long))
        self.register_buffer("stable", torch.tensor(bool(stable)))
        self.register_buffer("angle_prediction", torch.tensor(bool(angle_prediction)))
        self.register_buffer("input_norm", torch.tensor(INPUT_NORMS.index(input_norm), dtype=torch.long))
        self.register_buffer("rotation_standardized", torch.tensor(rotation_space == "standardized"))
        self.input_scale = nn.Parameter(torch.ones(d), requires_grad=False)
        self.rotation_scale = nn.Parameter(torch.ones(d), requires_grad=False)

    # ------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def prepare(self, h: torch.Tensor) -> None:
        """Set ``input_scale`` s from training activations ``h`` (n, d): their RMS over every
        coordinate (``input_norm="rms"``), each dimension's RMS (``"per_dimension"``), or leave
        it 1 (``"none"``); and ``rotation_scale`` to s when ``rotation_space="standardized"``.
        A dimension whose RMS is below 10⁻⁶ of the largest keeps that floor, so h̃ stays finite."""
        norm = self.input_norm_name
        if norm == "none":
            return
        h = torch.as_tensor(h)
        if h.dim() != 2 or h.shape[-1] != self.d or h.shape[0] == 0:
            raise ValueError(f"prepare needs training activations of shape (n > 0, {self.d}), got {tuple(h.shape)}.")
        square = h.double().square()
        rms = square.mean().sqrt().expand(self.d) if norm == "rms" else square.mean(0).sqrt()
        if not bool(torch.isfinite(rms).all()):
            raise ValueError("the training activations hold NaN or infinite values; check the model and dtype.")
        floor = float(rms.max()) * 1e-6
        if floor <= 0:
            raise ValueError("the training activations are all zero: nothing to learn a probe from.")
        self.input_scale.copy_(rms.clamp_min(floor).to(self.input_scale))
        if bool(self.host("rotation_standardized")):
            self.rotation_scale.copy_(self.input_scale)

    @property
    def input_norm_name(self) -> str:
        """The ``input_norm`` setting this module was built with (one of :data:`INPUT_NORMS`)."""
        return INPUT_NORMS[int(self.host("input_norm"))]

    def standardize(self, h: torch.Tensor) -> torch.Tensor:
        """h̃ = h ⊘ s, the coordinates HPR works in (h itself when s = 1)."""
        return h / self.input_scale.to(h.dtype)

    def probe_logits(self, h: torch.Tensor) -> torch.Tensor:
        """wᵀh̃, shape ``h.shape[:-1]``."""
        return self._probe_logits_of(self.standardize(h))

    def raw_angle(self, h: torch.Tensor) -> torch.Tensor:
        """π·σ(f(h̃)) ∈ (0, π), without α (what the loss trains)."""
        return self._raw_angle_of(self.standardize(h))

    def _probe_logits_of(self, standardized: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.probe(standardized)
        return logits.squeeze(-1)

    def _raw_angle_of(self, standardized: torch.Tensor) -> torch.Tensor:
        return math.pi * torch.sigmoid(self.angle_net(standardized).squeeze(-1))

    def gate(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The positions the probe marks negative (s = 0), which the edit rotates."""
        return self.probe_logits(h.to(self.probe.weight.dtype)) <= 0

    def angle(self, h: torch.Tensor) -> torch.Tensor:
        """θ̂ = α·π·σ(f(h))."""
        return self.alpha * self.raw_angle(h)

    def rotate(self, h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """h′ = c ⊙ R_θ(h ⊘ c): turn each h ⊘ c by ``theta`` towards its Householder reflection
        about the probe's hyperplane, keeping ‖h ⊘ c‖, and map it back (c = ``rotation_scale``:
        1 rotates h itself, s rotates h̃)."""
        x, w, wx, scale = self._rotation_coordinates(h)
        if bool(self.host("stable")):
            x_norm: torch.Tensor = x.norm(dim=-1, keepdim=True)
            u = x / x_norm.clamp_min(torch.finfo(h.dtype).tiny)
            w_perp = w - (u @ w).unsqueeze(-1) * u
            v: torch.Tensor = w_perp / w_perp.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
            # towards the positive side; a point on the hyperplane (wᵀh̃ = 0) is gated negative
            v = torch.where(wx > 0, -1.0, 1.0).to(h.dtype).unsqueeze(-1) * v
            t = theta.unsqueeze(-1)
            return _scaled_back(x_norm * (torch.cos(t) * u + torch.sin(t) * v), scale)
        reflected = _householder(x, w, wx)
        cos = F.cosine_similarity(x, reflected, dim=-1).clamp(-COS_CLIP, COS_CLIP)
        theta_ref = torch.arccos(cos)
        beta1 = torch.sin(theta) / torch.sin(theta_ref)
        beta2 = torch.sin(theta_ref - theta) / torch.sin(theta_ref)
        return _scaled_back(beta1.unsqueeze(-1) * reflected + beta2.unsqueeze(-1) * x, scale)

    def _rotation_coordinates(
        self, h: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x = h ⊘ c, the hyperplane's normal w in those coordinates, wᵀx, and c (None when c = 1,
        where h ⊘ c and c ⊙ h are h itself, bit for bit; see :func:`_scaled_back`)."""
        scale = None if self._unit_rotation_scale() else self.rotation_scale.to(h.dtype)
        # the hyperplane wᵀ(h ⊘ s) = 0 in the coordinates h ⊘ c has the normal w ⊙ c ⊘ s
        inputs = (self.probe.weight, self.rotation_scale, self.input_scale)
        w = self.derived(
            f"normal {h.dtype}",
            inputs,
            lambda: self._normal().to(h.dtype),
        )
        x = h if scale is None else h / scale
        return x, w, x @ w, scale

    def _normal(self) -> torch.Tensor:
        """w ⊙ c ⊘ s: the probe's hyperplane normal in the rotation space (coordinates h ⊘ c)."""
        return self.probe.weight.reshape(-1) * self.rotation_scale / self.input_scale

    def _unit_rotation_scale(self) -> bool:
        """Whether c = 1 (``rotation_space="raw"``), checked once per value of c outside
        autograd; False while autograd records."""
        if torch.is_grad_enabled():
            return False
        scale = self.rotation_scale
        unit: bool = self.derived("unit rotation scale", (scale,), lambda: bool((scale == 1).all()))
        return unit

    def reflect(self, h: torch.Tensor) -> torch.Tensor:
        """h′ = c ⊙ (x − 2 (wᵀx / ‖w‖²) w), x = h ⊘ c: the Householder reflection about the
        probe's hyperplane (−AnglePred's edit; norm-preserving in the rotation space)."""
        x, w, wx, scale = self._rotation_coordinates(h)
        return _scaled_back(_householder(x, w, wx), scale)

    def edit(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # compute in the parameters' precision (fp32 for a bf16 model, fp64 when trained in fp64)
        work = h.to(self.probe.weight.dtype)
        standardized = self.standardize(work)  # h̃, read by the probe and the angle net
        keep = self._probe_logits_of(standardized) > 0  # s = round(σ(wᵀh)) = 1
        if bool(self.host("angle_prediction")):
            moved = self.rotate(work, self.alpha * self._raw_angle_of(standardized))  # θ̂ = α·π·σ(f(h̃))
        else:
            moved = self.reflect(work)
        return torch.where(keep.unsqueeze(-1), work, moved)

    def frozen_edit(self) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """The fast path of :meth:`edit` for the default rotation (``angle_prediction`` and
        ``stable``): the probe wᵀh̃ and the angle network's first layer in one product (the probe
        as one more row of that layer), the angle network as plain functions, the normal and
        α·π built once, and the rotation h′ = ‖h‖ (cos θ̂ u + sin θ̂ v) with the scalars of
        u and v folded (equal to :meth:`edit` to float rounding). Other settings run :meth:`edit`."""
        if not (bool(self.host("angle_prediction")) and bool(self.host("stable"))):
            return self.edit
        linears = [m for m in self.angle_net if isinstance(m, nn.Linear)]
        gelus = [m.approximate for m in self.angle_net if isinstance(m, nn.GELU)]
        first = linears[0]
        joint_weight = torch.cat([self.probe.weight, first.weight], dim=0)
        joint_bias = torch.cat([first.bias.new_zeros(1), first.bias])
        rest = [(m.weight, m.bias) for m in linears[1:]]
        scale = None if self._unit_rotation_scale() else self.rotation_scale
        normal = self._normal()
        input_scale, alpha_pi = self.input_scale, float(self.alpha) * math.pi
        dtype = self.probe.weight.dtype
        tiny = torch.finfo(dtype).tiny

        def edit(h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            work = h.to(dtype)
            joint = F.linear(work / input_scale, joint_weight, joint_bias)
            hidden = joint[..., 1:]
            for approximate, (weight, bias) in zip(gelus, rest, strict=True):
                hidden = F.linear(F.gelu(hidden, approximate=approximate), weight, bias)
            theta = torch.sigmoid(hidden.squeeze(-1)) * alpha_pi  # θ̂ = α·π·σ(f(h̃))
            x = work if scale is None else work / scale
            x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            u = x / x_norm.clamp_min(tiny)
            w_perp = torch.addcmul(normal, u @ normal.unsqueeze(-1), u, value=-1.0)  # w − (uᵀw) u
            # v = −sign(wᵀx) w⊥/‖w⊥‖, so h′ = ‖x‖ cos θ̂ · u + ‖x‖ sin θ̂ (−sign(wᵀx)/‖w⊥‖) · w⊥
            side = torch.where((x @ normal) > 0, -1.0, 1.0).unsqueeze(-1)
            along_v = x_norm * side * torch.sin(theta).unsqueeze(-1)
            along_v = along_v / torch.linalg.vector_norm(w_perp, dim=-1, keepdim=True).clamp_min(tiny)
            moved = torch.addcmul(along_v * w_perp, x_norm * torch.cos(theta).unsqueeze(-1), u)
            moved = moved if scale is None else moved * scale
            return torch.where((joint[..., 0] > 0).unsqueeze(-1), work, moved)

        return edit

    # -------------------------------------------------------------------------------- loss
    def loss(self, h_pos: torch.Tensor, h_neg: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The paper's training loss on a batch of aligned pairs ``(n, d)`` each.

        BCE(σ(wᵀX), y) + MSE(θ̂(X), arccos(clip(cos(X, T)))) with X = [h⁺; h⁻], T = [h⁺; h⁺],
        y = [1; 0] (the probe and f read h̃, the angles are taken in the rotation space); θ̂ here
        is π·σ(f(X)) (α is an inference-time scale and is not trained).
        The two terms have disjoint parameters (the probe w; the angle net f): see
        :meth:`probe_loss` and :meth:`angle_loss`.
        """
        return self.probe_loss(h_pos, h_neg, reduction) + self.angle_loss(h_pos, h_neg, reduction)

    @staticmethod
    def _pairs(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        if h_pos.shape != h_neg.shape:
            raise ValueError(f"h_pos {tuple(h_pos.shape)} and h_neg {tuple(h_neg.shape)} must have the same shape.")
        return torch.cat([h_pos, h_neg], dim=0)

    def probe_loss(self, h_pos: torch.Tensor, h_neg: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """BCE(σ(wᵀX), y), X = [h⁺; h⁻], y = [1; 0]: the loss term of the probe w alone."""
        x = self._pairs(h_pos, h_neg)
        labels = torch.cat([torch.ones(len(h_pos)), torch.zeros(len(h_neg))]).to(x)
        return F.binary_cross_entropy_with_logits(self.probe_logits(x), labels, reduction=reduction)

    def angle_loss(self, h_pos: torch.Tensor, h_neg: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """MSE(θ̂(X), arccos(clip(cos(X ⊘ c, T ⊘ c)))), T = [h⁺; h⁺] (angles in the rotation
        space, c = ``rotation_scale``): the loss term of the angle net alone."""
        x = self._pairs(h_pos, h_neg)
        target = torch.cat([h_pos, h_pos], dim=0)
        scale = self.rotation_scale.to(x.dtype)
        cos = F.cosine_similarity(x / scale, target / scale, dim=-1)
        target_angle = torch.arccos(cos.clamp(-COS_CLIP, COS_CLIP))
        return F.mse_loss(self.raw_angle(x), target_angle, reduction=reduction)

    # ------------------------------------------------------------ stacked (all layers at once)
    # The same losses for L modules at once, written out with batched matrix products: the
    # trainer calls these instead of each layer's ``loss`` in turn (a step of HPR training
    # multiplies a few dozen rows, so the time is dispatch, which one batched call pays once).
    # ``weights`` maps parameter names to tensors with a leading layer axis, matrices stored
    # (L, in, out), i.e. each layer's ``nn.Linear.weight`` transposed; activations are (L, n, d).

    @staticmethod
    def stacked_probe_logits(weights: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """wₗᵀh̃ for every layer l: (L, n) from h (L, n, d)."""
        return _stacked_linear(_stacked_scaled(weights, h), weights["probe.weight"]).squeeze(-1)

    @staticmethod
    def stacked_raw_angle(weights: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """π·σ(fₗ(h̃)) for every layer l: (L, n) from h (L, n, d)."""
        out, i = _stacked_scaled(weights, h), 0
        while f"angle_net.{i}.weight" in weights:
            out = _stacked_linear(out, weights[f"angle_net.{i}.weight"], weights[f"angle_net.{i}.bias"])
            if f"angle_net.{i + 2}.weight" in weights:
                out = F.gelu(out)
            i += 2
        return math.pi * torch.sigmoid(out.squeeze(-1))

    @staticmethod
    def stacked_probe_loss(
        weights: Mapping[str, torch.Tensor], h_pos: torch.Tensor, h_neg: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`probe_loss` of every layer: (L,) from h⁺, h⁻ (L, n, d)."""
        x = torch.cat([h_pos, h_neg], dim=1)
        logits = HPRIntervention.stacked_probe_logits(weights, x)
        labels = torch.zeros_like(logits)
        labels[:, : h_pos.shape[1]] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)

    @staticmethod
    def stacked_angle_loss(
        weights: Mapping[str, torch.Tensor], h_pos: torch.Tensor, h_neg: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`angle_loss` of every layer: (L,) from h⁺, h⁻ (L, n, d)."""
        x = torch.cat([h_pos, h_neg], dim=1)
        target = torch.cat([h_pos, h_pos], dim=1)
        space = "rotation_scale"
        cos = F.cosine_similarity(_stacked_scaled(weights, x, space), _stacked_scaled(weights, target, space), dim=-1)
        target_angle = torch.arccos(cos.clamp(-COS_CLIP, COS_CLIP))
        return (HPRIntervention.stacked_raw_angle(weights, x) - target_angle).square().mean(-1)

    @staticmethod
    def stacked_loss(weights: Mapping[str, torch.Tensor], h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` of every layer: (L,) from h⁺, h⁻ (L, n, d)."""
        return HPRIntervention.stacked_probe_loss(weights, h_pos, h_neg) + HPRIntervention.stacked_angle_loss(
            weights, h_pos, h_neg
        )

    # -------------------------------------------------------------------------- save/load
    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        if isinstance(state_dict, dict):  # artifacts saved before the input scale: s = 1, as they were trained
            state_dict.setdefault(prefix + "input_scale", torch.ones(self.d))
            state_dict.setdefault(prefix + "input_norm", torch.tensor(INPUT_NORMS.index("none")))
            state_dict.setdefault(prefix + "rotation_scale", torch.ones(self.d))
            state_dict.setdefault(prefix + "rotation_standardized", torch.tensor(False))
            state_dict.setdefault(prefix + "angle_prediction", torch.tensor(True))
        widths = state_dict.get(prefix + "angle_widths")
        if widths is not None and widths.tolist() != self.angle_widths.tolist():
            device = self.probe.weight.device
            self.angle_net = _angle_net(self.d, widths.tolist()).to(device)
            self._buffers["angle_widths"] = widths.clone().to(device)

    @property
    def num_parameters(self) -> int:
        """Trained parameters (probe and angle net; the fixed scales are not counted)."""
        return sum(p.numel() for name, p in self.named_parameters() if name not in self.fixed_parameters)


def hpr_parameter_count(d: int, angle_hidden_widths: Optional[Sequence[int]] = None) -> int:
    """Parameters of one HPR module (probe + angle net) at hidden size ``d``."""
    widths = list(angle_hidden_widths or default_angle_widths(d))
    count = d  # probe, no bias
    width = d
    for w in widths + [1]:
        count += width * w + w
        width = w
    return count


@keyword_checked
def build_hpr_config(
    model: Any,
    layers: Sequence[int],
    *,
    modules: Optional[Mapping[int, HPRIntervention]] = None,
    alpha: float = 1.0,
    angle_hidden_widths: Optional[Sequence[int]] = None,
    stable: bool = True,
    input_norm: str = "rms",
    rotation_space: str = "raw",
    angle_prediction: Optional[bool] = None,
    position_policy: Optional[PolicyLike] = None,
    component: str = "block_output",
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` with one HPR module per layer.

    ``modules`` maps layer → trained :class:`HPRIntervention`; without it fresh (untrained)
    modules are created with the given hyperparameters, ready for training. ``alpha``,
    ``angle_prediction`` (None: keep the modules' own; fresh ones: true) and ``position_policy``
    also apply to trained modules: they act at inference only.
    """
    width = site_width(model, component)
    if modules is None:
        modules = {
            layer: HPRIntervention(
                embed_dim=width,
                alpha=alpha,
                angle_hidden_widths=angle_hidden_widths,
                stable=stable,
                input_norm=input_norm,
                rotation_space=rotation_space,
                angle_prediction=True if angle_prediction is None else angle_prediction,
                position_policy=position_policy,
            )
            for layer in layers
        }
    else:
        missing = [layer for layer in layers if layer not in modules]
        if missing:
            raise ValueError(f"no trained HPR module for layers {missing}; trained layers: {sorted(modules)}.")
        modules = {layer: modules[layer] for layer in layers}
        for module in modules.values():
            module.alpha.fill_(float(alpha))
            if angle_prediction is not None:
                module.angle_prediction.fill_(bool(angle_prediction))
            if position_policy is not None:
                module.set_position_policy(position_policy)
    first = next(iter(modules.values()))
    hyper = {
        "alpha": float(alpha),
        "angle_hidden_widths": first.angle_widths.tolist(),
        "stable": bool(first.stable),
        "angle_prediction": bool(first.angle_prediction),
        "input_norm": first.input_norm_name,
        "rotation_space": ROTATION_SPACES[1] if bool(first.rotation_standardized) else ROTATION_SPACES[0],
        "position_policy": first.policy.name.lower(),
    }
    return edit_config(model, "hpr", modules, component=component, hyperparameters=hyper, metadata=metadata)


SPEC = register_method(
    MethodSpec(
        name="hpr",
        title="Householder Pseudo-Rotation (Pham & Nguyen, EMNLP 2024)",
        intervention=HPRIntervention,
        settings_class=HPRSettings,
        site="block_output",
        order=4,
        format="hpr",
        reads="paired",
        splits=("train", "eval"),
        trained=True,
        strength="alpha",
        not_bakeable=(
            "HPR rotates each activation by an angle its angle network predicts from that activation, "
            "behind a probe's gate: no weight of the model computes that"
        ),
    )
)
