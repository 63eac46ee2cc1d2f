"""SEA — Spectral Editing of Activations (Qiu et al., NeurIPS 2024; yfqiu-nlp/sea-llm).

Closed form. From N demonstrations with a base, a positive and a negative completion, the
last-token activations of each at one site form H, H⁺, H⁻ (d × N). With Ω± = H H±ᵀ / N (not
centred) and its SVD Ω± = U± Σ± V±ᵀ, the energy of direction i is e_i = s_i² / Σ_j s_j², and
k(r) is the smallest k whose cumulative energy reaches r (default r = 0.998). Then

* P⁺ = U⁺_k U⁺_kᵀ keeps the directions most shared with positive demonstrations,
* P⁻ = I − U⁻_k U⁻_kᵀ removes the directions most shared with negative demonstrations,
* the edit is z = P⁺x + P⁻x, rescaled to keep the norm of x.

Only the factors U⁺ (d×k⁺) and U⁻ (d×k⁻) are stored (buffers ``U_pos``, ``U_neg``), never the
d×d projectors (the official release stores 64 MiB per layer per polarity at d = 4096).

Norm modes — the official code and the paper disagree:

* ``"token"`` (default): each token's edited vector is rescaled to the norm of its input,
  z_t ← z_t ‖x_t‖/‖z_t‖ (the paper's reading). It is the default because the result of a token
  then does not depend on which other tokens share its forward call, so it is identical with and
  without KV cache, with padding and across batch sizes.
* ``"feature"``: each feature j is rescaled across the edited tokens of a row in one forward call,
  z_{:,j} ← z_{:,j} ‖x_{:,j}‖/‖z_{:,j}‖ (the official code, run there with batch 1 on whole
  sequences). Choose it to reproduce the official numbers with full-sequence scoring; in cached
  generation each decode step then sees a single token.

Non-linear SEA applies a feature map φ before the covariances and φ⁻¹ after the projection:
squared-exponential φ(x) = exp(−x²/2) (inverse on the branch of the sign of x:
sign(x)·sqrt(−2 log φ)), tanh (inverse atanh) and elu (inverse log1p for negative values).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import pyvene as pv
import torch

from .base import ActEditIntervention
from .checks import check_int, check_layer_map, check_matrix, check_number
from .edits import edit_config, site_width
from .positions import PolicyLike, PositionPolicy
from .registry import FitContext, FitResult, MethodSettings, MethodSpec, register_method
from .settings import keyword_checked

_EPS = 1e-6


class NormMode(IntEnum):
    """How SEA restores norms (values stored in artifacts)."""

    TOKEN = 0
    FEATURE = 1

    @classmethod
    def parse(cls, value: NormModeLike) -> "NormMode":
        if isinstance(value, NormMode):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        if isinstance(value, int) and value in (0, 1):
            return cls(value)
        raise ValueError(f"Unknown SEA norm mode {value!r}; choose 'token' or 'feature'.")


class FeatureFunction(IntEnum):
    """Feature maps of non-linear SEA (values stored in artifacts)."""

    LINEAR = 0
    SQUARED_EXPONENTIAL = 1
    TANH = 2
    ELU = 3

    @classmethod
    def parse(cls, value: FeatureFunctionLike) -> "FeatureFunction":
        if isinstance(value, FeatureFunction):
            return value
        if value is None:
            return cls.LINEAR
        if isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            aliases = {"SQEXP": "SQUARED_EXPONENTIAL", "RBF": "SQUARED_EXPONENTIAL", "NONE": "LINEAR"}
            key = aliases.get(key, key)
            if key in cls.__members__:
                return cls[key]
        if isinstance(value, int) and value in {m.value for m in cls}:
            return cls(value)
        names = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"Unknown SEA feature function {value!r}; choose one of: {names}.")


def feature_map(x: torch.Tensor, fn: FeatureFunction) -> torch.Tensor:
    """φ(x)."""
    if fn == FeatureFunction.LINEAR:
        return x
    if fn == FeatureFunction.SQUARED_EXPONENTIAL:
        return torch.exp(-0.5 * x * x)
    if fn == FeatureFunction.TANH:
        return torch.tanh(x)
    if fn == FeatureFunction.ELU:
        return torch.nn.functional.elu(x)
    raise ValueError(f"Unknown feature function {fn!r}")


NormModeLike = Union[NormMode, str, int]
"""A norm mode, its name or its integer id (what :meth:`NormMode.parse` accepts)."""

FeatureFunctionLike = Union[FeatureFunction, str, int, None]
"""A feature function, its name or its integer id; None is ``linear`` (what :meth:`FeatureFunction.parse` accepts)."""


def inverse_feature_map(y: torch.Tensor, fn: FeatureFunction, reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """φ⁻¹(y). The squared exponential is even: its inverse takes the sign of ``reference``
    (the pre-edit activation); values are clamped into φ's range first."""
    if fn == FeatureFunction.LINEAR:
        return y
    if fn == FeatureFunction.SQUARED_EXPONENTIAL:
        y = y.clamp(_EPS, 1.0)
        magnitude = torch.sqrt(-2.0 * torch.log(y))
        sign = torch.ones_like(y) if reference is None else torch.where(reference < 0, -1.0, 1.0).to(y)
        return sign * magnitude
    if fn == FeatureFunction.TANH:
        return torch.atanh(y.clamp(-1 + _EPS, 1 - _EPS))
    if fn == FeatureFunction.ELU:
        return torch.where(y > 0, y, torch.log1p(y.clamp_min(-1 + _EPS)))
    raise ValueError(f"Unknown feature function {fn!r}")


@dataclass
class SEASettings(MethodSettings):
    """SEA's settings (a study's ``methods.sea.settings`` block).

    Attributes:
        layers: the layers edited (official: ``mlp_output`` of the last 21 of Llama-2-7B's 32,
            i.e. ``"1/3:"``; default all).
        energy_ratio: r, the share of spectral energy kept by each projection (official: 0.998).
        feature_function: φ of non-linear SEA: ``linear`` (default), ``squared_exponential``,
            ``tanh`` or ``elu``.
        norm_mode: ``token`` (default; the paper's reading, identical with and without KV cache)
            or ``feature`` (the official code); see the module docstring.
        base_tokens: new tokens of each base completion (the model's own greedy answer).
        position_policy: positions edited (official: every position, ``all``).
    """

    energy_ratio: float = 0.998
    feature_function: str = "linear"
    norm_mode: str = "token"
    base_tokens: int = 32
    position_policy: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.energy_ratio = check_number(self.energy_ratio, "SEA energy_ratio", low=0.0, high=1.0, low_open=True)
        self.feature_function = FeatureFunction.parse(self.feature_function).name.lower()
        self.norm_mode = NormMode.parse(self.norm_mode).name.lower()
        self.base_tokens = check_int(self.base_tokens, "SEA base_tokens")


class SEAIntervention(ActEditIntervention):
    """Spectral editing with stored low-rank factors; see the module docstring.

    Args:
        embed_dim: width d of the site (official default site: ``mlp_output``).
        U_pos, U_neg: optional factors (d×k⁺, d×k⁻) with orthonormal columns; default rank 0
            (an edit that reduces to z = 0 + x, i.e. the identity).
        norm_mode: ``"token"`` (default) or ``"feature"``.
        feature_function: ``linear`` (default), ``squared_exponential``, ``tanh`` or ``elu``.
    """

    default_policy = PositionPolicy.ALL
    method_name = "sea"

    U_pos: torch.Tensor
    U_neg: torch.Tensor
    norm_mode: torch.Tensor
    feature_function: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        U_pos: Optional[torch.Tensor] = None,
        U_neg: Optional[torch.Tensor] = None,
        norm_mode: NormModeLike = "token",
        feature_function: FeatureFunctionLike = "linear",
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        d = self.d
        U_pos = torch.zeros(d, 0) if U_pos is None else torch.as_tensor(U_pos, dtype=torch.float32)
        U_neg = torch.zeros(d, 0) if U_neg is None else torch.as_tensor(U_neg, dtype=torch.float32)
        for name, U in (("U_pos", U_pos), ("U_neg", U_neg)):
            if U.dim() != 2 or U.shape[0] != d:
                raise ValueError(f"{name} must have shape (d={d}, k), got {tuple(U.shape)}.")
            if not torch.isfinite(U).all():
                raise ValueError(f"{name} contains NaN or inf values.")
        self.register_buffer("U_pos", U_pos.contiguous())
        self.register_buffer("U_neg", U_neg.contiguous())
        self.register_buffer("norm_mode", torch.tensor(int(NormMode.parse(norm_mode)), dtype=torch.long))
        self.register_buffer(
            "feature_function", torch.tensor(int(FeatureFunction.parse(feature_function)), dtype=torch.long)
        )

    def resizable_buffers(self) -> Tuple[str, ...]:
        return ("U_pos", "U_neg")

    def full_sequence_reason(self) -> Optional[str]:
        if NormMode(int(self.host("norm_mode"))) == NormMode.FEATURE:
            return f"{type(self).__name__} uses norm_mode='feature' (statistics over all tokens of a forward call)"
        return super().full_sequence_reason()

    @property
    def ranks(self) -> Tuple[int, int]:
        return (self.U_pos.shape[1], self.U_neg.shape[1])

    def projectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P⁺, P⁻) as dense d×d matrices — for inspection and tests only."""
        eye = torch.eye(self.d, dtype=self.U_pos.dtype, device=self.U_pos.device)
        return self.U_pos @ self.U_pos.T, eye - self.U_neg @ self.U_neg.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P⁺x + P⁻x = x + U⁺(U⁺ᵀx) − U⁻(U⁻ᵀx), in O(d·k) per token."""
        U_pos, U_neg = self.U_pos.to(x.dtype), self.U_neg.to(x.dtype)
        return x + (x @ U_pos) @ U_pos.T - (x @ U_neg) @ U_neg.T

    def edit(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        work = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        fn = FeatureFunction(int(self.host("feature_function")))
        z = inverse_feature_map(self.project(feature_map(work, fn)), fn, reference=work)
        if NormMode(int(self.host("norm_mode"))) == NormMode.TOKEN:
            scale: torch.Tensor = work.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            return z * scale
        weight = mask.unsqueeze(-1).to(work.dtype)  # statistics over the edited tokens only
        x_norm = (work * work * weight).sum(dim=1, keepdim=True).sqrt()
        z_norm = (z * z * weight).sum(dim=1, keepdim=True).sqrt()
        return z * (x_norm / z_norm.clamp_min(_EPS))

    def frozen_edit(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The fast path of :meth:`edit` for the default linear φ and per-token norm:
        c = x [U⁺ U⁻], the coefficients on U⁻ negated, z = x + c [U⁺ U⁻]ᵀ (equal to
        :meth:`project` to float rounding), then z·‖x‖/‖z‖. Two products on one copy of the
        factors: at a decode step they come from memory at every edited layer and token, and
        the second product finds them in cache. Other settings run :meth:`edit`."""
        linear = FeatureFunction(int(self.host("feature_function"))) == FeatureFunction.LINEAR
        if not linear or NormMode(int(self.host("norm_mode"))) != NormMode.TOKEN:
            return self.edit
        factors = torch.cat([self.U_pos, self.U_neg], dim=1)
        k_pos, d = self.U_pos.shape[1], self.d

        def edit(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = (h.float() if h.dtype in (torch.float16, torch.bfloat16) else h).reshape(-1, d)
            U = factors.to(x.dtype)
            c = x @ U
            c[:, k_pos:].neg_()
            z = torch.addmm(x, c, U.T)
            x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            z_norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(_EPS)
            return z.mul_(x_norm / z_norm).reshape(h.shape)

        return edit


def energy_rank(singular_values: torch.Tensor, ratio: float) -> int:
    """Smallest k with Σ_{i<k} s_i² / Σ s_j² ≥ ratio."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"energy ratio must be in (0, 1], got {ratio}.")
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(ratio - 1e-12, dtype=torch.float64)).item()) + 1


def fit_sea_factors(
    H: torch.Tensor,
    H_pos: torch.Tensor,
    H_neg: torch.Tensor,
    energy_ratio: float = 0.998,
    feature_function: FeatureFunctionLike = "linear",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form SEA factors from N last-token activations, each ``(N, d)``.

    Ω± = φ(H)ᵀ φ(H±) / N in float64, U± from its SVD, truncated to k(r). Returns ``(U_pos, U_neg)``
    as float32 tensors of shape (d, k⁺) and (d, k⁻).
    """
    fn = FeatureFunction.parse(feature_function)
    mats = []
    for name, M in (("H", H), ("H_pos", H_pos), ("H_neg", H_neg)):
        M = torch.as_tensor(M)
        if M.dim() != 2 or M.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, d) matrix, got shape {tuple(M.shape)}.")
        if not torch.isfinite(M).all():
            raise ValueError(f"{name} contains NaN or inf values; check the collected activations.")
        mats.append(feature_map(M.double(), fn))
    base, pos, neg = mats
    if not (base.shape == pos.shape == neg.shape):
        raise ValueError(f"H, H_pos, H_neg must have equal shapes, got {[tuple(m.shape) for m in mats]}.")
    n = base.shape[0]
    factors = []
    for other in (pos, neg):
        omega = base.T @ other / n
        U, S, _ = torch.linalg.svd(omega)
        k = energy_rank(S, energy_ratio)
        factors.append(U[:, :k].float().contiguous())
    u_pos, u_neg = factors
    return u_pos, u_neg


@dataclass
class SEAFactors:
    """Result of :func:`fit_sea`.

    Attributes:
        factors: layer → (U⁺ (d×k⁺), U⁻ (d×k⁻)), float32 with orthonormal columns.
        energy_ratio: the energy ratio r that chose each k.
        feature_function: the feature map φ (``linear``, ``squared_exponential``, ``tanh``, ``elu``).
        num_examples: N, the number of demonstrations per layer.
    """

    factors: Dict[int, Tuple[torch.Tensor, torch.Tensor]]
    energy_ratio: float
    feature_function: str
    num_examples: int

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("SEAFactors needs factors for at least one layer.")
        self.feature_function = FeatureFunction.parse(self.feature_function).name.lower()

    @property
    def ranks(self) -> Dict[int, Tuple[int, int]]:
        """layer → (k⁺, k⁻)."""
        return {layer: (int(u.shape[1]), int(v.shape[1])) for layer, (u, v) in self.factors.items()}

    @property
    def record(self) -> Dict[str, Any]:
        """How the factors were chosen (the artifact's ``fit`` metadata)."""
        return {
            "energy_ratio": self.energy_ratio,
            "num_examples": self.num_examples,
            "ranks": {str(layer): list(r) for layer, r in self.ranks.items()},
        }

    def config(
        self,
        model: Any,
        *,
        norm_mode: str = "token",
        position_policy: Optional[PolicyLike] = None,
        component: str = "mlp_output",
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> pv.IntervenableConfig:
        """The ``IntervenableConfig`` of this fit (one SEA module per layer)."""
        return build_sea_config(
            model,
            self.factors,
            norm_mode=norm_mode,
            feature_function=self.feature_function,
            position_policy=position_policy,
            component=component,
            metadata={"fit": self.record, **(metadata or {})},
        )


def fit_sea(
    H: Mapping[int, Any],
    H_pos: Mapping[int, Any],
    H_neg: Mapping[int, Any],
    *,
    energy_ratio: float = 0.998,
    feature_function: FeatureFunctionLike = "linear",
) -> SEAFactors:
    """Fit SEA on every layer of ``H`` (:func:`fit_sea_factors` per layer).

    Args:
        H: layer → (N, d) activations of the base (model's own) completions, one row per
            demonstration (last token).
        H_pos: layer → (N, d) activations of the positive completions, row i paired with H's row i.
        H_neg: layer → (N, d) activations of the negative completions.
        energy_ratio: r in (0, 1]; k = the smallest rank whose cumulative energy s_i² reaches r.
        feature_function: ``linear`` (default) or a non-linear map φ applied before the
            covariances (``squared_exponential``, ``tanh``, ``elu``).
    """
    energy_ratio = check_number(energy_ratio, "energy_ratio", low=0.0, high=1.0, low_open=True)
    fn = FeatureFunction.parse(feature_function)
    layers = check_layer_map("H", H)
    check_layer_map("H_pos", H_pos, layers)
    check_layer_map("H_neg", H_neg, layers)
    factors = {}
    n = 0
    for layer in layers:
        base = check_matrix(H[layer], f"H[{layer}]")
        pos = check_matrix(H_pos[layer], f"H_pos[{layer}]", width=base.shape[1], rows=base.shape[0])
        neg = check_matrix(H_neg[layer], f"H_neg[{layer}]", width=base.shape[1], rows=base.shape[0])
        n = base.shape[0]
        factors[layer] = fit_sea_factors(base, pos, neg, energy_ratio=energy_ratio, feature_function=fn)
    return SEAFactors(factors=factors, energy_ratio=energy_ratio, feature_function=fn.name.lower(), num_examples=int(n))


@keyword_checked
def build_sea_config(
    model: Any,
    factors: Mapping[int, Tuple[torch.Tensor, torch.Tensor]],
    *,
    norm_mode: NormModeLike = "token",
    feature_function: FeatureFunctionLike = "linear",
    position_policy: Optional[PolicyLike] = None,
    component: str = "mlp_output",
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` with one SEA module per layer; ``factors`` maps layer → (U⁺, U⁻)."""
    modules = _modules(site_width(model, component), factors, norm_mode, feature_function, position_policy)
    first = next(iter(modules.values()))
    hyper = {
        "norm_mode": NormMode(int(first.norm_mode)).name.lower(),
        "feature_function": FeatureFunction(int(first.feature_function)).name.lower(),
        "ranks": {str(layer): list(m.ranks) for layer, m in modules.items()},
        "position_policy": first.policy.name.lower(),
    }
    return edit_config(model, "sea", modules, component=component, hyperparameters=hyper, metadata=metadata)


def _modules(
    width: int,
    factors: Mapping[int, Any],
    norm_mode: NormModeLike,
    feature_function: FeatureFunctionLike,
    position_policy: Optional[PolicyLike],
) -> Dict[int, SEAIntervention]:
    return {
        layer: SEAIntervention(
            embed_dim=width,
            U_pos=u_pos,
            U_neg=u_neg,
            norm_mode=norm_mode,
            feature_function=feature_function,
            position_policy=position_policy,
        )
        for layer, (u_pos, u_neg) in factors.items()
    }


def _fit(inputs: Mapping[str, Any], config: SEASettings, context: FitContext) -> FitResult:
    result = fit_sea(
        inputs["base"],
        inputs["pos"],
        inputs["neg"],
        energy_ratio=config.energy_ratio,
        feature_function=config.feature_function,
    )
    modules = _modules(context.width, result.factors, config.norm_mode, config.feature_function, config.position_policy)
    return FitResult(modules, result.record)


SPEC = register_method(
    MethodSpec(
        name="sea",
        title="Spectral Editing of Activations (Qiu et al., NeurIPS 2024)",
        intervention=SEAIntervention,
        settings_class=SEASettings,
        site="mlp_output",
        order=3,
        format="sea",
        reads="aligned",
        roles=("base", "pos", "neg"),
        splits=("train",),
        fit=_fit,
        not_bakeable=(
            "SEA projects each activation and rescales it to its own norm (per token): a projection "
            "without the norm restoration would be a different edit"
        ),
    )
)
