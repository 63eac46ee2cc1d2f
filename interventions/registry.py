"""The method registry: one :class:`MethodSpec` per method, found by its name.

Each method module (:mod:`~actedit.interventions.hpr`, ``sea``, ``iti``, ``caa``, ``actadd``)
holds its intervention class, its typed settings (a :class:`MethodSettings`), its math and its fit
entry, and registers them once with :func:`register_method`. Everything above the interventions
(the pipeline, the study, the CLI, the one-call API, the tests) loops over :func:`methods` and
reads what it needs from the spec; nothing there branches on a method's name.

What a spec says:

* **what it is**: the intervention class, the settings class, the default site (pyvene
  component), the composition order at a shared site;
* **what it collects**: the prompt format (a name of :mod:`actedit.data.formats`) and the view
  of the activation store its fit reads (:data:`VIEWS`);
* **how it is made**: ``fit`` (closed form, from tensors) or ``trained`` (by
  :mod:`actedit.train.trainer`, on the loss terms the intervention class declares);
* **how it bakes into weights**: ``bake`` gives the biases that reproduce one of its modules
  exactly (:class:`BakedBias`, read by ``actedit export --to hf``), or ``not_bakeable`` says why
  it cannot.

To add a method, see "How to add a method" in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

from .layers import LayerSpec, check_layer_spec
from .positions import PositionPolicy
from .settings import Settings, UnknownSettingError

STRENGTH = "strength"
"""The key every method accepts for its own strength field (:attr:`MethodSpec.strength`)."""

VIEWS = {
    "paired": "every (positive, negative) response pair of an example, positions aligned up to the shorter "
    "response; rows of positives and negatives paired one to one",
    "labeled": "positive (label 1) and negative (label 0) rows, in store order, per split",
    "aligned": "one row per role (``spec.roles``) for the same (example, response, position)",
}
"""The views of an activation store a method's fit or training reads (``MethodSpec.reads``)."""


@dataclass
class MethodSettings(Settings):
    """Fields every method's settings share (its ``fit`` block); each method adds its own.

    Attributes:
        layers: the layers the method works on (a layer spec of
            :mod:`actedit.interventions.layers`): the layers collected, and the layers edited or
            (HPR, ITI) the candidates it selects from. None: the method's default
            (:attr:`MethodSpec.default_layers`).
        site: the pyvene component edited; None: the method's default site.
        position_policy: which positions are edited (:class:`~actedit.interventions.positions.PositionPolicy`).
    """

    INFERENCE_ONLY: ClassVar[Tuple[str, ...]] = ("position_policy",)
    """Fields that change only how a fitted module edits, not what is fitted (a strength held in a
    buffer: ITI's ``alpha``, CAA's ``multiplier``, HPR's ``alpha``): runs that differ only in them
    share one fit or training, and a sweep sets them on a fitted module (see
    :meth:`~actedit.interventions.base.ActEditIntervention.set_inference_setting`)."""

    layers: Optional[LayerSpec] = None
    site: Optional[str] = None
    position_policy: str = "all"

    def __post_init__(self) -> None:
        check_layer_spec(self.layers, "layers")
        if self.site is not None and (not isinstance(self.site, str) or not self.site):
            raise ValueError(f"site must be a pyvene component name such as 'block_output', got {self.site!r}.")
        self.position_policy = PositionPolicy.parse(self.position_policy).name.lower()

    def intervention_arguments(self) -> Dict[str, Any]:
        """The intervention constructor's arguments these settings give (a trained method's fresh
        modules are built with them)."""
        return {"position_policy": self.position_policy}


@dataclass
class TrainedMethodSettings(MethodSettings):
    """Fields every trained method's settings share: it trains a module on each of its layers
    and keeps the best by the selection its :class:`TrainingRecipe` declares.

    Attributes:
        top_layers: layers enabled, the best by the method's selection score (HPR's k: eval probe
            accuracy); a method whose layers are ``fixed`` enables every layer it trains.
        strategy: ``probe_first`` (the selecting loss term on every layer, then the other terms
            on the selected layers only; see :func:`actedit.train.trainer.train_method`) or
            ``joint`` (every term of every layer together, then selection).
        keep_layers: ``selected`` (default: the artifact holds the top ``top_layers`` modules,
            small) or ``all`` (every trained layer's module, all terms trained on every layer;
            the selected ones are enabled and the rest saved switched off, so ``actedit chat``
            and the layer-count curve can turn any of them on).
    """

    MOVED = {"top_k": "top_layers"}

    top_layers: int = 5
    strategy: str = "probe_first"
    keep_layers: str = "selected"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 1:
            raise ValueError(f"top_layers must be a positive integer, got {self.top_layers!r}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}.")
        if self.keep_layers not in KEEP_LAYERS:
            raise ValueError(f"keep_layers must be one of {', '.join(KEEP_LAYERS)}, got {self.keep_layers!r}.")


STRATEGIES = ("probe_first", "joint")
"""How a trained method trains before it selects layers (:class:`TrainedMethodSettings`)."""

KEEP_LAYERS = ("selected", "all")
"""Which trained layers an artifact holds (:attr:`TrainedMethodSettings.keep_layers`)."""

SELECTIONS = {
    "probe_accuracy": "the layers whose probe (``probe_logits(h) > 0`` ⇔ positive) separates the eval pairs best",
    "eval_loss": "the layers with the lowest mean loss of the selecting term on the eval pairs",
    "fixed": "no selection: every layer trained is enabled",
}
"""How a trained method picks the layers it enables (:attr:`TrainingRecipe.selection`)."""

TRAINABLE_VIEWS = ("paired",)
"""The store views :mod:`actedit.train.trainer` trains on (a trained method's ``reads``)."""


@dataclass(frozen=True)
class LossTerm:
    """One loss term of a trained method.

    Attributes:
        method: the intervention's method ``method(h_pos, h_neg) -> scalar`` computing it on a
            batch of aligned pairs (``(n, d)`` each); a ``stacked_<method>(weights, h_pos, h_neg)``
            static method on the class gives every layer's loss at once (the trainer's fast path).
        trains: prefix of the parameters it trains (disjoint from the other terms'); the
            checkpoint of this term holds exactly these, per layer.
        shows: what a progress bar shows beside the loss while the term trains
            (``("probe_accuracy",)``: the training batches' probe accuracy).
    """

    method: str
    trains: str
    shows: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.method or not isinstance(self.method, str):
            raise ValueError(f"a loss term needs the name of its loss method, got {self.method!r}.")
        if not isinstance(self.trains, str):
            raise ValueError(f"loss term {self.method!r}: trains must be a parameter-name prefix, got {self.trains!r}.")
        unknown = [s for s in self.shows if s != "probe_accuracy"]
        if unknown:
            raise ValueError(f"loss term {self.method!r}: shows knows only probe_accuracy, got {unknown}.")


@dataclass(frozen=True)
class TrainingRecipe:
    """What a trained method declares (its intervention class's ``training_recipe``; ``training`` is
    torch's train/eval flag); the trainer,
    layer selection, progress bars and checkpoints follow it (:mod:`actedit.train.trainer`).

    Attributes:
        terms: its loss terms, in training order; the module's loss is their sum.
        selection: how its layers are selected, a key of :data:`SELECTIONS`.
        selection_term: the term trained on every layer before the selection (default: the
            first); the other terms train after it, on the selected layers only (strategy
            ``probe_first``), or with it (``joint``). Its loss is the ``eval_loss`` score.

    Checkpoints: a training run writes one folder per term under its checkpoint directory, named
    after the term's method (strategy ``joint``: the directory itself, all terms together), each holding the
    parameters that term trains on every layer it trains, the optimiser, the schedule and the
    epochs' history; the fixed parameters enter the fingerprint a resumed run must match.
    """

    terms: Tuple[LossTerm, ...]
    selection: str = "probe_accuracy"
    selection_term: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.terms or not all(isinstance(t, LossTerm) for t in self.terms):
            raise ValueError("a training recipe needs at least one LossTerm.")
        names = [t.method for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss terms must be distinct, got {names}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}.")
        if self.selection_term is not None and self.selection_term not in names:
            raise ValueError(f"selection_term {self.selection_term!r} is not one of the loss terms {names}.")

    @property
    def selecting(self) -> LossTerm:
        """The term trained on every layer before the selection."""
        name = self.selection_term or self.terms[0].method
        return next(t for t in self.terms if t.method == name)

    @property
    def rest(self) -> Tuple[LossTerm, ...]:
        """The other terms, in order."""
        return tuple(t for t in self.terms if t.method != self.selecting.method)

    def check(self, cls: type, where: str) -> None:
        """Errors, before any work, for a class that lacks what this recipe names."""
        for term in self.terms:
            if not callable(getattr(cls, term.method, None)):
                raise ValueError(f"{where}: {cls.__name__} has no {term.method}(h_pos, h_neg) loss method.")
        needs_probe = self.selection == "probe_accuracy" or any("probe_accuracy" in t.shows for t in self.terms)
        if needs_probe and not callable(getattr(cls, "probe_logits", None)):
            raise ValueError(
                f"{where}: {cls.__name__} has no probe_logits(h), which selection/shows probe_accuracy needs; "
                "select its layers by eval_loss or fix them."
            )


@dataclass(frozen=True)
class FitContext:
    """What a closed-form fit knows about the model besides the activations.

    Attributes:
        width: width of the site's activations.
        num_heads: attention heads per layer (head-level methods).
    """

    width: int
    num_heads: int


@dataclass
class FitResult:
    """What a closed-form fit returns: one intervention per edited layer, and a record of how it
    was chosen (stored under ``fit`` in the artifact's metadata)."""

    modules: Dict[int, Any]
    record: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("a fit must produce at least one intervention.")


BIAS_SLOTS = ("o_proj", "down_proj")
"""Where a baked edit can live in a decoder layer: the bias of the attention output projection
(its output is added to the residual stream) or of the MLP's down projection."""


@dataclass(frozen=True)
class BakedBias:
    """A bias that reproduces an edit exactly when added to the output of one module of its layer.

    Attributes:
        slot: the module, one of :data:`BIAS_SLOTS`.
        bias: ``(width of that module's output,)``, float32 or float64.
        residual: the bias stands for a shift of the residual stream, so it is exact only where
            the family adds the slot's output to the residual stream unchanged (no norm between).
    """

    slot: str
    bias: Any
    residual: bool = False

    def __post_init__(self) -> None:
        if self.slot not in BIAS_SLOTS:
            raise ValueError(f"a baked bias slot must be one of {BIAS_SLOTS}, got {self.slot!r}.")


Baker = Callable[[Any, str, Callable[[str], Any]], List[BakedBias]]
"""``bake(module, component, weight_of) -> [BakedBias, ...]``: the biases equal to ``module``'s
edit at every position of site ``component``; ``weight_of(slot)`` is the weight of a slot's module
in the edited layer. Raises ``ValueError`` with the reason when this module cannot be baked."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything actedit needs to know about one method (see the module docstring).

    Attributes:
        name: the method's name (``hpr``), as in configs and artifacts.
        title: its full name and source, for reports (``Householder Pseudo-Rotation (Pham & Nguyen, 2024)``).
        intervention: its :class:`~actedit.interventions.base.ActEditIntervention` subclass.
        settings_class: its settings, a :class:`MethodSettings` subclass.
        site: the pyvene component it edits by default.
        order: rank among edits sharing a site in a composition (lower runs first).
        format: the prompt format it collects with (:data:`actedit.data.formats.FORMATS`).
        reads: the view of the activation store it reads (:data:`VIEWS`).
        roles: the roles of an ``aligned`` view, in order.
        splits: the data splits it reads (``("train", "eval")`` where it selects on eval data;
            ``()``: the data has no splits, e.g. ActAdd's one prompt pair).
        fit: closed form: ``fit(inputs, config, context) -> FitResult``; ``inputs`` holds the view,
            per split for ``labeled`` (see :func:`actedit.train.pipeline.fit_inputs`).
        trained: trained by :mod:`actedit.train.trainer` on what the intervention class declares
            in its ``training_recipe`` (a :class:`TrainingRecipe`) instead of fitted.
        default_layers: the layers it works on when ``layers`` is unset: ``"all"``, or None when
            the user must choose (one steered layer never silently means every layer).
        strength: the settings field that scales the edit (HPR's and ITI's ``alpha``, CAA's
            ``multiplier``, ActAdd's ``coefficient``), which every caller may also set as
            ``strength``; None for a method without one (SEA's edit is a projection).
        bake: how a module of this method becomes biases (a :data:`Baker`); None when it cannot.
        not_bakeable: why it cannot, for the export's error (when ``bake`` is None).
    """

    name: str
    title: str
    intervention: type
    settings_class: Type[MethodSettings]
    site: str
    order: int
    format: str
    reads: str
    roles: Tuple[str, ...] = ("pos", "neg")
    splits: Tuple[str, ...] = ("train",)
    fit: Optional[Callable[..., FitResult]] = None
    trained: bool = False
    default_layers: Optional[str] = "all"
    strength: Optional[str] = None
    bake: Optional[Baker] = None
    not_bakeable: str = ""

    def __post_init__(self) -> None:
        if self.reads not in VIEWS:
            raise ValueError(f"method {self.name!r}: reads must be one of {', '.join(VIEWS)}, got {self.reads!r}.")
        if (self.fit is None) == (not self.trained):
            raise ValueError(f"method {self.name!r} needs exactly one of a fit function or trained=True.")
        if not issubclass(self.settings_class, MethodSettings):
            raise ValueError(f"method {self.name!r}: settings_class must derive from MethodSettings.")
        if self.trained and not issubclass(self.settings_class, TrainedMethodSettings):
            raise ValueError(
                f"method {self.name!r} is trained, so its settings_class must derive from TrainedMethodSettings."
            )
        if self.trained:
            recipe = getattr(self.intervention, "training_recipe", None)
            if not isinstance(recipe, TrainingRecipe):
                raise ValueError(
                    f"method {self.name!r} is trained, so {self.intervention.__name__} must declare "
                    "training_recipe = TrainingRecipe(terms=(LossTerm(...), ...), selection=...)."
                )
            recipe.check(self.intervention, f"method {self.name!r}")
            if self.reads not in TRAINABLE_VIEWS:
                raise ValueError(
                    f"method {self.name!r} is trained, but the trainer reads only the views "
                    f"{', '.join(TRAINABLE_VIEWS)}, not {self.reads!r}."
                )
            if "eval" not in self.splits and recipe.selection != "fixed":
                raise ValueError(
                    f"method {self.name!r} selects layers by {recipe.selection} on eval data: its splits "
                    "must include 'eval' (or declare selection='fixed')."
                )
        if getattr(self.intervention, "method_name", None) != self.name:
            raise ValueError(f"{self.intervention.__name__}.method_name must be {self.name!r}.")
        if self.strength is not None and self.strength not in self.settings_class.field_names():
            raise ValueError(
                f"method {self.name!r}: strength names {self.strength!r}, which is not a field of "
                f"{self.settings_class.__name__}."
            )

    def settings(self, values: Optional[Mapping[str, Any]] = None, where: str = "", **extra: Any) -> MethodSettings:
        """This method's settings from a mapping and keywords (unknown keys are errors); a
        ``strength`` key stands for the method's own strength field (:attr:`strength`)."""
        where = where or f"{self.name} settings"
        if isinstance(values, self.settings_class):
            values = values.to_dict()
        merged = {**(values or {}), **extra} if isinstance(values, Mapping) or values is None else values
        if isinstance(merged, Mapping) and STRENGTH in merged:
            merged = dict(merged)
            if self.strength is None:
                raise UnknownSettingError(
                    f"{where}.{STRENGTH}: {self.name} has no strength setting (its edit is "
                    f"not scaled); valid keys: {', '.join(self.settings_class.field_names())}."
                )
            if self.strength in merged:
                raise UnknownSettingError(
                    f"{where}: give {STRENGTH} or {self.strength}, not both ({STRENGTH} is "
                    f"{self.name}'s {self.strength})."
                )
            merged[self.strength] = merged.pop(STRENGTH)
        return self.settings_class.from_mapping(merged, where)

    @property
    def training(self) -> Optional["TrainingRecipe"]:
        """A trained method's recipe (its intervention class's ``training_recipe``); None when fitted."""
        return getattr(self.intervention, "training_recipe", None) if self.trained else None

    def component(self, config: Optional[MethodSettings] = None) -> str:
        """The site edited: the settings' ``site`` or the method's default."""
        return (config.site if config is not None and config.site else None) or self.site


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method (once per name; registering the same spec again is a no-op)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"a method named {spec.name!r} is already registered ({existing.intervention.__name__}).")
    _REGISTRY[spec.name] = spec
    return spec


def methods() -> List[MethodSpec]:
    """Every registered method, in composition order."""
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def method_names() -> List[str]:
    """The registered method names, in composition order."""
    return [s.name for s in methods()]


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name (case-insensitive), with a clear error for unknown names."""
    key = str(name).strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(method_names())}.")
    return _REGISTRY[key]


def spec_of(intervention: Any) -> Optional[MethodSpec]:
    """The spec of an intervention instance or class (None for interventions of other libraries)."""
    name = getattr(intervention, "method_name", None)
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    cls = intervention if isinstance(intervention, type) else type(intervention)
    return spec if spec is not None and issubclass(cls, spec.intervention) else None
