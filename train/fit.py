"""Closed-form fits: SEA, ITI, CAA and ActAdd from collected activations.

Every fit takes in-memory activations keyed by layer, ``{layer: (N, d)}`` (torch tensors or
numpy arrays), plus labels where the method needs them, and returns a small result object holding
the per-layer tensors and a :meth:`config` method that builds the ready
``pyvene.IntervenableConfig`` with the builders of :mod:`actedit.interventions`. Inputs are
validated up front: empty matrices, NaN/inf values, mismatched shapes or layer sets and
one-class labels raise :class:`ValueError` naming the offending input and layer.

The math of each fit (h ∈ R^d is one activation vector):

* **SEA** (:func:`fit_sea`): Ω± = φ(H)ᵀ φ(H±) / N in float64 (not centred), Ω± = U± S± V±ᵀ,
  k± = the smallest k with Σ_{i<k} s_i² / Σ_j s_j² ≥ r (default r = 0.998); the edit keeps
  U⁺_{k⁺} (P⁺ = U⁺U⁺ᵀ) and removes U⁻_{k⁻} (P⁻ = I − U⁻U⁻ᵀ). Only the factors are stored.
* **ITI** (:func:`fit_iti`): one scikit-learn ``LogisticRegression`` per (layer, head) on the
  head's slice of the o_proj input, trained on the train split; heads ranked by validation
  accuracy over all layers; the top K (default 48) get θ̂_h = normalised mass-mean shift
  mean(true) − mean(false) over train ∪ validation (default) or the normalised probe weight, and
  σ_h = std (ddof 0, ``np.std``) of the tuning activations projected on θ̂_h. Edit
  x_h ← x_h + α σ_h θ̂_h.
* **CAA** (:func:`fit_caa`): v = mean_i (h⁺_i − h⁻_i) over contrast pairs.
* **ActAdd** (:func:`fit_actadd`): X = c · (A₁ − A₂), two per-position matrices (n, d) of the
  steering prompts at ``block_input`` (the shorter prompt is right-padded at tokenization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from actedit.interventions.iti import ITI_DIRECTIONS
from actedit.interventions.sea import FeatureFunction, fit_sea_factors


# ---------------------------------------------------------------------------------- validation
def _as_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a float64 tensor (numpy arrays, memmaps and tensors accepted)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad input
            raise ValueError(f"{name} is not a numeric array ({type(x).__name__}): {exc}") from None
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold numbers, got dtype {t.dtype}.")
    return t.to(torch.float64)


def check_matrix(x: Any, name: str, *, width: Optional[int] = None, rows: Optional[int] = None) -> torch.Tensor:
    """Validate one activation matrix: 2-D, non-empty, finite, optional width / row count.

    Returns it as a float64 tensor.
    """
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) matrix, got shape {tuple(t.shape)}.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); collect activations first.")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has width {t.shape[1]} but {width} was expected.")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows but {rows} were expected (rows must be paired).")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values in {bad} of {t.shape[0]} rows; "
                         "check the collected activations (fp16 overflow?).")
    return t


def check_layers(name: str, acts: Any, reference: Optional[Sequence[int]] = None) -> List[int]:
    """Validate a ``{layer: matrix}`` mapping; returns its layers, sorted.

    With ``reference`` the mapping must hold exactly those layers.
    """
    if not isinstance(acts, Mapping):
        raise ValueError(f"{name} must map layer index -> (N, d) activations, got {type(acts).__name__}.")
    if len(acts) == 0:
        raise ValueError(f"{name} holds no layers.")
    layers = []
    for layer in acts:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) < 0:
            raise ValueError(f"{name}: layer keys must be non-negative integers, got {layer!r}.")
        layers.append(int(layer))
    layers.sort()
    if reference is not None and layers != sorted(reference):
        raise ValueError(f"{name} holds layers {layers} but {sorted(reference)} were expected.")
    return layers


def check_labels(labels: Any, n: int, name: str = "labels") -> torch.Tensor:
    """Binary labels (bool or 0/1) of length ``n`` as a bool tensor."""
    t = torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with one label per row ({n}), got shape {tuple(t.shape)}.")
    if t.dtype != torch.bool:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values.")
        values = set(torch.unique(t).tolist())
        if not values <= {0, 1}:
            raise ValueError(f"{name} must be binary (0/1 or bool: 1 = true/positive), got values {sorted(values)}.")
        t = t != 0
    return t


# ----------------------------------------------------------------------------------------- SEA
@dataclass
class SEAFit:
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
            raise ValueError("SEAFit needs factors for at least one layer.")
        self.feature_function = FeatureFunction.parse(self.feature_function).name.lower()

    @property
    def ranks(self) -> Dict[int, Tuple[int, int]]:
        """layer → (k⁺, k⁻)."""
        return {layer: (int(u.shape[1]), int(v.shape[1])) for layer, (u, v) in self.factors.items()}

    def config(self, model, *, norm_mode: str = "token", position_policy=None, component: str = "mlp_output",
               metadata: Optional[dict] = None):
        """The ``IntervenableConfig`` of this fit (one SEA module per layer)."""
        from actedit.interventions import build_sea_config

        fit = {"energy_ratio": self.energy_ratio, "num_examples": self.num_examples}
        return build_sea_config(model, self.factors, norm_mode=norm_mode, feature_function=self.feature_function,
                                position_policy=position_policy, component=component,
                                metadata={"fit": fit, **(metadata or {})})


def fit_sea(H: Mapping[int, Any], H_pos: Mapping[int, Any], H_neg: Mapping[int, Any], *,
            energy_ratio: float = 0.998, feature_function="linear") -> SEAFit:
    """Fit SEA on every layer of ``H``.

    Args:
        H: layer → (N, d) activations of the base (model's own) completions, one row per
            demonstration (last token).
        H_pos: layer → (N, d) activations of the positive completions, row i paired with H's row i.
        H_neg: layer → (N, d) activations of the negative completions.
        energy_ratio: r in (0, 1]; k = the smallest rank whose cumulative energy s_i² reaches r.
        feature_function: ``linear`` (default) or a non-linear map φ applied before the
            covariances (``squared_exponential``, ``tanh``, ``elu``).
    """
    if not 0.0 < float(energy_ratio) <= 1.0:
        raise ValueError(f"energy_ratio must be in (0, 1], got {energy_ratio}.")
    fn = FeatureFunction.parse(feature_function)
    layers = check_layers("H", H)
    check_layers("H_pos", H_pos, layers)
    check_layers("H_neg", H_neg, layers)
    factors = {}
    n = None
    for layer in layers:
        base = check_matrix(H[layer], f"H[{layer}]")
        pos = check_matrix(H_pos[layer], f"H_pos[{layer}]", width=base.shape[1], rows=base.shape[0])
        neg = check_matrix(H_neg[layer], f"H_neg[{layer}]", width=base.shape[1], rows=base.shape[0])
        n = base.shape[0]
        factors[layer] = fit_sea_factors(base, pos, neg, energy_ratio=float(energy_ratio), feature_function=fn)
    return SEAFit(factors=factors, energy_ratio=float(energy_ratio), feature_function=fn.name.lower(),
                  num_examples=int(n))


# ----------------------------------------------------------------------------------------- ITI
@dataclass
class ITIFit:
    """Result of :func:`fit_iti`.

    Attributes:
        heads: layer → ``{"directions": (n_heads, head_dim), "sigmas": (n_heads,), "heads": [...]}``
            for :func:`~actedit.interventions.build_iti_config`; only layers with a selected head
            appear; unselected heads have zero direction and σ = 0.
        val_accuracy: layer → (n_heads,) validation accuracy of each head's probe.
        ranking: every (layer, head, accuracy), best first (ties: lower layer, then lower head).
        selected: the top-K (layer, head) pairs, best first.
        num_heads: heads per layer.
        alpha: intervention strength α.
        direction: ``mass_mean`` or ``probe``.
    """

    heads: Dict[int, Dict[str, Any]]
    val_accuracy: Dict[int, torch.Tensor]
    ranking: List[Tuple[int, int, float]]
    selected: List[Tuple[int, int]]
    num_heads: int
    alpha: float = 15.0
    direction: str = "mass_mean"

    def __post_init__(self) -> None:
        if self.direction not in ITI_DIRECTIONS:
            raise ValueError(f"direction must be one of {ITI_DIRECTIONS}, got {self.direction!r}.")
        if not self.heads or not self.selected:
            raise ValueError("ITIFit needs at least one selected head.")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}.")

    def config(self, model, *, alpha: Optional[float] = None, position_policy=None,
               component: str = "attention_value_output", metadata: Optional[dict] = None):
        """The ``IntervenableConfig`` of this fit (one ITI module per layer with selected heads)."""
        from actedit.interventions import build_iti_config

        n_model = int(model.config.num_attention_heads)
        if n_model != self.num_heads:
            raise ValueError(f"this ITI fit has {self.num_heads} heads per layer but the model has {n_model}.")
        fit = {"direction": self.direction, "top_k": len(self.selected),
               "selected": [[layer, head, round(self._acc(layer, head), 6)] for layer, head in self.selected]}
        return build_iti_config(model, self.heads, alpha=self.alpha if alpha is None else float(alpha),
                                position_policy=position_policy, component=component, metadata={"fit": fit, **(metadata or {})})

    def _acc(self, layer: int, head: int) -> float:
        return float(self.val_accuracy[layer][head])


def _probe_std(acts: torch.Tensor, direction: torch.Tensor) -> float:
    """σ = np.std(acts @ θ̂) with ddof 0, as the official ``get_interventions_dict``."""
    return float((acts @ direction).std(correction=0))


def fit_iti(train_acts: Mapping[int, Any], train_labels: Any, val_acts: Mapping[int, Any], val_labels: Any, *,
            num_heads: int, top_k: int = 48, direction: str = "mass_mean", alpha: float = 15.0, seed: int = 0,
            max_iter: int = 1000, tuning_acts: Optional[Mapping[int, Any]] = None, progress: bool = False) -> ITIFit:
    """Fit ITI: probe every (layer, head), keep the top-K heads by validation accuracy.

    Args:
        train_acts: layer → (N, n_heads·head_dim) o_proj inputs at the last token of
            "Q: {question} A: {choice}", rows of the train questions.
        train_labels: (N,) 1 = the choice is true.
        val_acts, val_labels: the same for the validation questions (split by question).
        num_heads: attention heads per layer (the width must divide evenly).
        top_k: heads to intervene on (paper: 48), capped at the number of heads available.
        direction: ``mass_mean`` (default: mean(true) − mean(false) over train ∪ validation, as
            the official ``get_com_directions``) or ``probe`` (the train probe's weight).
            Both are normalised to unit length.
        alpha: α of the edit x_h ← x_h + α σ_h θ̂_h.
        seed: ``random_state`` of every ``LogisticRegression``.
        max_iter: iterations of each ``LogisticRegression`` (official: 1000).
        tuning_acts: layer → (M, d) activations whose projections give σ (default: train ∪
            validation; the official script used every question, test included).
        progress: show a tqdm bar over layers.
    """
    from sklearn.linear_model import LogisticRegression

    if direction not in ITI_DIRECTIONS:
        raise ValueError(f"direction must be one of {ITI_DIRECTIONS}, got {direction!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}.")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha}.")
    layers = check_layers("train_acts", train_acts)
    check_layers("val_acts", val_acts, layers)
    if tuning_acts is not None:
        check_layers("tuning_acts", tuning_acts, layers)
    first = check_matrix(train_acts[layers[0]], f"train_acts[{layers[0]}]")
    width = first.shape[1]
    if width % num_heads:
        raise ValueError(f"the activation width {width} is not divisible by num_heads={num_heads}.")
    head_dim = width // num_heads
    y_train = check_labels(train_labels, first.shape[0], "train_labels")
    if bool(y_train.all()) or not bool(y_train.any()):
        raise ValueError("train_labels need both true and false examples to fit probes.")
    n_val = check_matrix(val_acts[layers[0]], f"val_acts[{layers[0]}]", width=width).shape[0]
    y_val = check_labels(val_labels, n_val, "val_labels")
    y_train_np, y_val_np = y_train.numpy().astype(np.int64), y_val.numpy().astype(np.int64)
    y_all = torch.cat([y_train, y_val])

    accuracy: Dict[int, torch.Tensor] = {}
    probes: Dict[Tuple[int, int], np.ndarray] = {}
    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="ITI probes", unit="layer")
    for layer in iterator:
        xt = check_matrix(train_acts[layer], f"train_acts[{layer}]", width=width, rows=len(y_train))
        xv = check_matrix(val_acts[layer], f"val_acts[{layer}]", width=width, rows=len(y_val))
        ht = xt.reshape(len(xt), num_heads, head_dim).numpy()
        hv = xv.reshape(len(xv), num_heads, head_dim).numpy()
        accs = torch.zeros(num_heads, dtype=torch.float64)
        for head in range(num_heads):
            clf = LogisticRegression(random_state=seed, max_iter=max_iter).fit(ht[:, head], y_train_np)
            accs[head] = float((clf.predict(hv[:, head]) == y_val_np).mean())
            probes[(layer, head)] = clf.coef_.reshape(-1).astype(np.float64)
        accuracy[layer] = accs

    ranking = sorted(((layer, head, float(accuracy[layer][head])) for layer in layers for head in range(num_heads)),
                     key=lambda t: (-t[2], t[0], t[1]))
    k = min(int(top_k), len(ranking))
    selected = [(layer, head) for layer, head, _ in ranking[:k]]

    heads: Dict[int, Dict[str, Any]] = {}
    for layer in sorted({layer for layer, _ in selected}):
        # read again rather than keep every layer in memory (32 layers x 4096 wide in float64 is GBs)
        xt = check_matrix(train_acts[layer], f"train_acts[{layer}]", width=width)
        xv = check_matrix(val_acts[layer], f"val_acts[{layer}]", width=width)
        usable = torch.cat([xt, xv]).reshape(-1, num_heads, head_dim)
        if tuning_acts is None:
            tuning = usable
        else:
            tuning = check_matrix(tuning_acts[layer], f"tuning_acts[{layer}]", width=width)
            tuning = tuning.reshape(-1, num_heads, head_dim)
        directions = torch.zeros(num_heads, head_dim, dtype=torch.float64)
        sigmas = torch.zeros(num_heads, dtype=torch.float64)
        chosen = sorted(head for l_, head in selected if l_ == layer)
        for head in chosen:
            if direction == "mass_mean":
                vec = usable[y_all, head].mean(0) - usable[~y_all, head].mean(0)
            else:
                vec = torch.from_numpy(probes[(layer, head)])
            norm = vec.norm()
            if not float(norm) > 0:
                raise ValueError(f"layer {layer} head {head}: the {direction} direction is zero; "
                                 "true and false activations do not differ there.")
            unit = vec / norm
            directions[head] = unit
            sigmas[head] = _probe_std(tuning[:, head], unit)
        heads[layer] = {"directions": directions.float(), "sigmas": sigmas.float(), "heads": chosen}
    return ITIFit(heads=heads, val_accuracy=accuracy, ranking=ranking, selected=selected, num_heads=int(num_heads),
                  alpha=float(alpha), direction=direction)


# ----------------------------------------------------------------------------------------- CAA
@dataclass
class CAAFit:
    """Result of :func:`fit_caa`.

    Attributes:
        vectors: layer → v (d,), float32.
        num_pairs: number of contrast pairs averaged.
    """

    vectors: Dict[int, torch.Tensor]
    num_pairs: int

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("CAAFit needs a vector for at least one layer.")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be positive, got {self.num_pairs}.")

    def config(self, model, *, multiplier: float = 1.0, position_policy=None, position_start: int = 0,
               component: str = "block_output", metadata: Optional[dict] = None):
        """The ``IntervenableConfig`` of this fit (one CAA module per layer)."""
        from actedit.interventions import build_caa_config

        return build_caa_config(model, self.vectors, multiplier=multiplier, position_policy=position_policy,
                                position_start=position_start, component=component,
                                metadata={"fit": {"num_pairs": self.num_pairs}, **(metadata or {})})


def fit_caa(pos: Mapping[int, Any], neg: Mapping[int, Any]) -> CAAFit:
    """CAA vectors v = mean_i (h⁺_i − h⁻_i) per layer (float64 accumulation).

    Args:
        pos: layer → (N, d) activations at the answer token of the positive completions.
        neg: layer → (N, d) activations of the paired negative completions (row i ↔ row i).
    """
    layers = check_layers("pos", pos)
    check_layers("neg", neg, layers)
    vectors = {}
    n = 0
    for layer in layers:
        p = check_matrix(pos[layer], f"pos[{layer}]")
        q = check_matrix(neg[layer], f"neg[{layer}]", width=p.shape[1], rows=p.shape[0])
        vectors[layer] = (p - q).mean(0).to(torch.float32)
        n = p.shape[0]
    return CAAFit(vectors=vectors, num_pairs=int(n))


# -------------------------------------------------------------------------------------- ActAdd
@dataclass
class ActAddFit:
    """Result of :func:`fit_actadd`.

    Attributes:
        steering: layer → X (n, d), coefficient applied, float32.
        coefficient: the coefficient c.
    """

    steering: Dict[int, torch.Tensor]
    coefficient: float = 1.0

    def __post_init__(self) -> None:
        if not self.steering:
            raise ValueError("ActAddFit needs a steering matrix for at least one layer.")
        if not math.isfinite(self.coefficient):
            raise ValueError(f"coefficient must be finite, got {self.coefficient}.")

    @property
    def length(self) -> int:
        """n, the number of steered prompt positions."""
        return int(next(iter(self.steering.values())).shape[0])

    def config(self, model, *, position_policy=None, component: str = "block_input", metadata: Optional[dict] = None):
        """The ``IntervenableConfig`` of this fit (one ActAdd module per layer)."""
        from actedit.interventions import build_actadd_config

        return build_actadd_config(model, self.steering, coefficient=self.coefficient,
                                   position_policy=position_policy, component=component, metadata=metadata)


def fit_actadd(prompt1: Mapping[int, Any], prompt2: Mapping[int, Any], *, coefficient: float = 1.0,
               allow_length_mismatch: bool = False) -> ActAddFit:
    """ActAdd x-vectors X = c · (A₁ − A₂) per layer.

    Args:
        prompt1, prompt2: layer → (n, d) activations at ``block_input`` of every position of each
            steering prompt (BOS included). Pad the shorter *prompt* at tokenization (e.g. with
            a space token, as the paper) so both have n positions.
        coefficient: c.
        allow_length_mismatch: zero-extend the shorter matrix instead of raising.
    """
    if not math.isfinite(float(coefficient)):
        raise ValueError(f"coefficient must be finite, got {coefficient}.")
    layers = check_layers("prompt1", prompt1)
    check_layers("prompt2", prompt2, layers)
    steering = {}
    for layer in layers:
        a1 = check_matrix(prompt1[layer], f"prompt1[{layer}]")
        a2 = check_matrix(prompt2[layer], f"prompt2[{layer}]", width=a1.shape[1])
        if a1.shape[0] != a2.shape[0] and not allow_length_mismatch:
            raise ValueError(
                f"layer {layer}: the steering prompts have {a1.shape[0]} and {a2.shape[0]} positions. Right-pad "
                "the shorter prompt at tokenization (e.g. with a space token) or pass allow_length_mismatch=True."
            )
        n = max(a1.shape[0], a2.shape[0])
        pad = lambda a: torch.cat([a, a.new_zeros(n - a.shape[0], a.shape[1])])  # noqa: E731
        steering[layer] = (float(coefficient) * (pad(a1) - pad(a2))).to(torch.float32)
    lengths = {x.shape[0] for x in steering.values()}
    if len(lengths) != 1:
        raise ValueError(f"every layer needs the same number of positions, got {sorted(lengths)}.")
    return ActAddFit(steering=steering, coefficient=float(coefficient))


__all__ = [
    "ActAddFit", "CAAFit", "ITIFit", "ITI_DIRECTIONS", "SEAFit", "check_labels", "check_layers", "check_matrix",
    "fit_actadd", "fit_caa", "fit_iti", "fit_sea",
]
