"""One training loop for every trainable intervention on cached activations (HPR), all layers at once.

The loop (:func:`run_training`) is the released HPR recipe (HF ``Trainer`` defaults of
``train_guidance_householder.sh``):

* AdamW (β = (0.9, 0.999), ε = 1e-8, weight decay 0; torch's fused kernel where available),
  learning rate 5e-4, fp32;
* T = ⌈N / B⌉ · E optimiser steps (B = 16 pairs, E = 5 epochs), warmup W = ⌈0.05 · T⌉ steps;
  learning-rate factor f(t) = t / W for t < W, then (T − t) / (T − W) (``linear``, the released
  script), ½(1 + cos(π (t − W) / (T − W))) (``cosine``, what the paper states) or 1 (``constant``);
* gradient-norm clipping at 1.0 (HF default), applied **per layer** so that layers stay
  independent (the released script clipped the joint gradient of all layers);
* each epoch draws a fresh permutation of the examples from ``(seed, epoch)`` only, so a resumed
  run replays the same batches;
* after each epoch: evaluation, the best epoch so far (by the mean over layers of the eval probe
  accuracy, the released ``lr_acc``; or per layer), and an atomic checkpoint; at the end the best
  epoch's weights are restored.

**Cached activations** (:func:`train_interventions`, :func:`train_top_layers`). The data are
aligned pairs (h⁺, h⁻) of every layer (:class:`~actedit.data.store.PairedActivations`). Every
layer l has its own module with its own loss ℓ_l = ``module.loss(h⁺_l, h⁻_l)`` on the same batch
of pairs; the reported loss is (1/L) Σ_l ℓ_l, and each layer's parameters θ_l receive exactly
∂ℓ_l/∂θ_l (the gradient of Σ_l ℓ_l), i.e. what training that layer alone would give.

Two paths compute it (:class:`PairObjective`). The fast one (``vectorize=True``, the default) stacks
the per-layer parameters into tensors with a leading layer axis and evaluates the loss of all
layers with a few batched matrix products, through the module class's ``stacked_<loss>``
methods (:class:`~actedit.interventions.hpr.HPRIntervention` has them); the trained weights are
written back into one module per layer. The reference (``vectorize=False``, and any class without
stacked losses) loops over layers and calls each module's own loss; both give the same weights
up to float rounding, which the tests check.

End-to-end training through a ``pyvene.IntervenableModel`` with the LM loss lives in
:mod:`actedit.train.lm` and runs the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import pyvene as pv
import torch
from torch import nn
from tqdm.auto import tqdm

from actedit.data.store import PairedActivations
from actedit.interventions.files import write_atomic
from actedit.interventions.registry import TrainingRecipe, method_spec
from actedit.interventions.settings import Settings

from .select import LayerSelection, select_layers

SCHEDULES = ("linear", "cosine", "constant")
"""Learning-rate schedules after warmup."""

BEST_BY = ("mean", "layer")
"""How the best epoch is chosen: one epoch for all layers by the mean score, or one per layer."""

CHECKPOINT_NAME = "trainer_state.pt"
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------- configs
@dataclass
class TrainSettings(Settings):
    """Hyperparameters of :func:`run_training` (defaults: HPR's released training script).

    Attributes:
        learning_rate: peak AdamW learning rate (5e-4).
        epochs: passes over the training examples (5).
        batch_size: examples (pairs of activations, or sequences) per optimiser step (16).
        warmup_ratio: fraction of the optimiser steps with a linear warmup from 0 (0.05; the
            warmup length is ⌈ratio · total steps⌉, as HF's Trainer).
        schedule: ``linear`` decay to 0 after warmup (default, the released script), ``cosine``
            (the paper) or ``constant``.
        weight_decay: AdamW decoupled weight decay (0, HF's default).
        adam_betas: AdamW (β₁, β₂).
        adam_eps: AdamW ε.
        max_grad_norm: clip the gradient norm of each layer's parameters (cached activations)
            or of all parameters (end-to-end) to this value; None disables clipping (1.0).
        seed: seeds module initialisation (:func:`new_interventions`) and the per-epoch batch order.
        select_best: restore the weights of the best epoch at the end (needs eval data).
        best_by: ``mean`` (one epoch for all layers, by the mean eval score) or ``layer``
            (each layer keeps its own best epoch; cached activations only).
        eval_batch_size: examples per evaluation chunk.
        vectorize: train all layers at once through the module class's stacked losses (the fast
            path); False loops over layers (the reference; also used for classes without them).
        checkpoint_dir: directory for an atomic checkpoint after every epoch; None disables.
        resume: continue from the checkpoint in ``checkpoint_dir`` when one exists.
        progress: show a tqdm progress bar with loss and accuracy.
        device: where to train cached-activation modules (``cpu``, ``cuda``, ...); None = the
            modules' device. End-to-end training runs where the model is.
        dtype: ``float32`` (default) or ``float64`` for the parameters and activations of
            cached-activation training (end-to-end training keeps the model's dtype).
        stop_after_epoch: stop after this many epochs of the ``epochs``-long schedule (the
            learning rate follows the full schedule); None runs all epochs.
        stream: read each batch's activations from the store's shards when it is needed instead
            of every layer's rows into memory first (True, the default: memory does not grow with
            the number of layers or examples; the results are the same). Used where the pairs come
            from an activation store (:func:`actedit.train.pipeline.make_edit`).
        cpu_threads: torch threads while training on cached activations on the CPU. None
            (default): 1 where idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, advised on a
            shared machine), else torch's setting. A step runs ~100 small operations,
            and under PASSIVE each wakes the sleeping thread: HPR's angle-net step (5 layers, 2
            cores) took 7.7–8.8 ms with 2 threads, 5.7 ms with 1, and 4.4–5.4 ms with 2 threads
            under OpenMP's default policy (idle threads spin a while).
    """

    learning_rate: float = 5e-4
    epochs: int = 5
    batch_size: int = 16
    warmup_ratio: float = 0.05
    schedule: str = "linear"
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    select_best: bool = True
    best_by: str = "mean"
    eval_batch_size: int = 1024
    vectorize: bool = True
    checkpoint_dir: Optional[str] = None
    resume: bool = True
    progress: bool = True
    device: Optional[str] = None
    dtype: str = "float32"
    stop_after_epoch: Optional[int] = None
    stream: bool = True
    cpu_threads: Optional[int] = None

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        if not (
            isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            positive_int(name)
        if not 0.0 <= float(self.warmup_ratio) < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}.")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps!r}.")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if self.best_by not in BEST_BY:
            raise ValueError(f"best_by must be one of {BEST_BY}, got {self.best_by!r}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        if self.cpu_threads is not None:
            positive_int("cpu_threads")
        if self.stop_after_epoch is not None:
            positive_int("stop_after_epoch")
            if self.stop_after_epoch > self.epochs:
                raise ValueError(f"stop_after_epoch ({self.stop_after_epoch}) cannot exceed epochs ({self.epochs}).")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        keep = (
            "learning_rate",
            "epochs",
            "batch_size",
            "warmup_ratio",
            "schedule",
            "weight_decay",
            "adam_betas",
            "adam_eps",
            "max_grad_norm",
            "seed",
            "best_by",
            "select_best",
            "vectorize",
            "dtype",
            "stop_after_epoch",
        )
        return {k: v for k, v in self.to_dict().items() if k in keep}


@dataclass
class EpochRecord:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        step: optimiser steps done at the end of the epoch.
        train_loss: mean over the epoch's steps of the batch loss (mean over layers).
        train_accuracy: mean probe accuracy on the training batches (modules with a probe).
        eval_loss: mean loss on the eval data (None without eval data).
        score: the model-selection score (higher is better; None without eval data).
        metric: the name of ``score`` (``probe_accuracy`` or ``neg_eval_loss``).
        layer_scores: layer → score (cached-activation training).
        learning_rate: learning rate of the epoch's last step.
        seconds: wall-clock time of the epoch (training and evaluation).
    """

    epoch: int
    step: int
    train_loss: float
    train_accuracy: Optional[float] = None
    eval_loss: Optional[float] = None
    score: Optional[float] = None
    metric: Optional[str] = None
    layer_scores: Optional[Dict[int, float]] = None
    learning_rate: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ValueError(f"epoch numbers start at 1, got {self.epoch}.")


@dataclass
class TrainResult:
    """Outcome of a training run.

    Attributes:
        modules: layer → trained module (cached activations; None for end-to-end training,
            whose interventions are trained in place inside the ``IntervenableModel``).
        history: one :class:`EpochRecord` per epoch.
        best_epoch: the epoch whose weights were restored (None when nothing was selected; with
            ``best_by='layer'`` the epoch of the best mean score, see ``layer_best_epochs``).
        best_score: the selection score of the restored weights (mean over layers).
        metric: name of the score.
        layer_scores: layer → eval score of the restored weights.
        layer_best_epochs: layer → epoch restored for that layer (``best_by='layer'``).
        steps: optimiser steps done (in total, over all runs of a resumed training).
        seconds: wall-clock seconds of this call.
        resumed_from_epoch: the epoch a resumed run started after (None: a fresh run).
        config: the configuration used.
    """

    modules: Optional[Dict[int, nn.Module]]
    history: List[EpochRecord]
    best_epoch: Optional[int]
    best_score: Optional[float]
    metric: Optional[str]
    layer_scores: Optional[Dict[int, float]]
    layer_best_epochs: Optional[Dict[int, int]]
    steps: int
    seconds: float
    resumed_from_epoch: Optional[int]
    config: TrainSettings

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")
        if self.best_epoch is not None and not 1 <= self.best_epoch <= len(self.history):
            raise ValueError(f"best_epoch {self.best_epoch} is not one of the {len(self.history)} epochs run.")

    def summary(self) -> dict:
        """JSON-serialisable summary for artifact metadata (``save_artifact(..., training=...)``)."""
        out = {
            "epochs": len(self.history),
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "metric": self.metric,
            "best_score": self.best_score,
            "config": self.config.fingerprint(),
            "history": [{k: v for k, v in asdict(r).items() if k != "layer_scores"} for r in self.history],
        }
        if self.layer_scores is not None:
            out["layer_scores"] = {str(k): float(v) for k, v in self.layer_scores.items()}
        if self.layer_best_epochs is not None:
            out["layer_best_epochs"] = {str(k): int(v) for k, v in self.layer_best_epochs.items()}
        return out


# --------------------------------------------------------------------------------------- tasks
class TrainingObjective:
    """What :func:`run_training` needs from a kind of training (cached pairs, end-to-end LM)."""

    name = "task"
    per_layer = False

    @property
    def num_examples(self) -> int:
        raise NotImplementedError

    def parameters(self) -> List[torch.Tensor]:
        """Leaf tensors the optimiser updates."""
        raise NotImplementedError

    def loss(self, idx: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """(tensor to back-propagate, display metrics incl. ``loss``) for the examples ``idx``;
        the tensor is None when the task has already back-propagated (loop over layers)."""
        raise NotImplementedError

    def clip_(self, max_norm: float) -> None:
        raise NotImplementedError

    def evaluate(self) -> Optional[Dict[str, Any]]:
        """``{"metric", "score", "eval_loss", "layer_scores"}`` or None without eval data."""
        return None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def layer_keys(self, layer: int) -> List[str]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def train_mode(self, training: bool) -> None:
        pass

    def finalize(self) -> Optional[Dict[int, nn.Module]]:
        return None

    def close(self) -> None:
        pass


def _recipe(cls: type) -> Optional[TrainingRecipe]:
    """The class's declared :class:`~actedit.interventions.registry.TrainingRecipe`, if any."""
    recipe = getattr(cls, "training_recipe", None)
    return recipe if isinstance(recipe, TrainingRecipe) else None


def _stacked_method(cls: type, method: str) -> Optional[Callable]:
    """``cls.stacked_<method>`` when the class that defines it also defines ``method`` (a
    subclass that overrides ``method`` alone must not inherit the stacked version)."""

    def owner(name: str) -> Optional[type]:
        return next((k for k in cls.__mro__ if name in vars(k)), None)

    stacked = owner(f"stacked_{method}")
    return getattr(cls, f"stacked_{method}") if stacked is not None and stacked is owner(method) else None


class PairObjective(TrainingObjective):
    """Train one module per layer on cached (h⁺, h⁻) pairs with each module's ``loss_method``.

    The fast path stacks the layers' parameters (matrices stored transposed, (L, in, out), the
    layout the stacked losses multiply by and their gradients land in) and calls the module
    class's ``stacked_<loss_method>``; the reference loops over layers. See the module docstring.
    """

    name = "pairs"
    per_layer = True

    def __init__(
        self,
        modules: Mapping[int, nn.Module],
        train: PairedActivations,
        eval_data: Optional[PairedActivations],
        config: TrainSettings,
        loss_method: Union[str, Sequence[str], None] = None,
        *,
        metric: Optional[str] = None,
        shows_accuracy: Optional[bool] = None,
    ) -> None:
        """Args:
        modules, train, eval_data, config: see the class docstring.
        loss_method: the loss method each module is trained on, or several (their sum);
            None: every term of the class's ``training_recipe`` (else ``loss``).
        metric: the eval score: ``probe_accuracy`` (modules with ``probe_logits``) or
            ``eval_loss`` (−the eval loss, higher is better); None: the recipe's selection
            (probe accuracy for a class with a probe and no recipe).
        shows_accuracy: show the training batches' probe accuracy; None: when a term being
            trained declares it (``LossTerm.shows``).
        """
        if not isinstance(modules, Mapping) or not modules:
            raise ValueError("modules must be a non-empty mapping layer -> trainable intervention.")
        if not isinstance(train, PairedActivations):
            raise ValueError(f"train must be PairedActivations, got {type(train).__name__}.")
        if eval_data is not None and not isinstance(eval_data, PairedActivations):
            raise ValueError(f"eval_data must be PairedActivations or None, got {type(eval_data).__name__}.")
        self.layers = sorted(int(layer) for layer in modules)
        self.modules = {layer: modules[layer] for layer in self.layers}
        for name, data in (("train", train), ("eval", eval_data)):
            if data is None:
                continue
            missing = [layer for layer in self.layers if layer not in data.positive]
            if missing:
                raise ValueError(f"the {name} activations hold no layers {missing} (they hold {data.layers}).")
        first = self.modules[self.layers[0]]
        recipe = _recipe(type(first))
        if loss_method is None:
            loss_method = [t.method for t in recipe.terms] if recipe is not None else "loss"
        self.loss_methods = [loss_method] if isinstance(loss_method, str) else list(loss_method)
        if not self.loss_methods:
            raise ValueError("loss_method names no loss term.")
        self.loss_method = "+".join(self.loss_methods)
        for layer, module in self.modules.items():
            if not isinstance(module, pv.TrainableIntervention):
                raise ValueError(f"layer {layer}: {type(module).__name__} is not a pyvene TrainableIntervention.")
            for method in self.loss_methods:
                if not callable(getattr(module, method, None)):
                    raise ValueError(f"layer {layer}: {type(module).__name__} has no {method}(h_pos, h_neg) method.")
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"layer {layer}: {type(module).__name__} has no trainable parameters.")
            width = getattr(module, "embed_dim", None)
            if width is not None and int(width) != train.width:
                raise ValueError(
                    f"layer {layer}: the module was built for width {int(width)} but the "
                    f"activations have width {train.width}."
                )
        self.train_data, self.eval_data, self.config = train, eval_data, config
        self.dtype = config.torch_dtype
        self.home = next(first.parameters()).device
        self.home_dtype = next(first.parameters()).dtype
        self.device = torch.device(config.device) if config.device is not None else self.home
        probes = all(callable(getattr(m, "probe_logits", None)) for m in self.modules.values())
        if metric is None:
            selection = recipe.selection if recipe is not None else ("probe_accuracy" if probes else "eval_loss")
            metric = "probe_accuracy" if selection == "probe_accuracy" else "eval_loss"
        if metric not in ("probe_accuracy", "eval_loss"):
            raise ValueError(f"metric must be probe_accuracy or eval_loss, got {metric!r}.")
        if shows_accuracy is None:
            shown = {s for t in (recipe.terms if recipe else ()) if t.method in self.loss_methods for s in t.shows}
            shows_accuracy = "probe_accuracy" in shown if recipe is not None else probes
        if (metric == "probe_accuracy" or shows_accuracy) and not probes:
            raise ValueError(
                f"{type(first).__name__} has no probe_logits(h): score its layers by metric='eval_loss' "
                "and do not show probe accuracy."
            )
        self.metric = metric
        self.has_probe = metric == "probe_accuracy" or bool(shows_accuracy)
        self.shows_accuracy = bool(shows_accuracy)
        self.names_by_layer = {
            layer: [
                n for n, p in m.named_parameters() if p.requires_grad and n not in getattr(m, "fixed_parameters", ())
            ]
            for layer, m in self.modules.items()
        }
        self.names = self.names_by_layer[self.layers[0]]
        shapes = {n: p.shape for n, p in first.named_parameters()}
        uniform = all(
            type(m) is type(first)
            and {n: p.shape for n, p in m.named_parameters()} == shapes
            and self.names_by_layer[layer] == self.names
            for layer, m in self.modules.items()
        )
        if config.vectorize and not uniform:
            warnings.warn(
                "the modules differ in class, parameter shapes or which parameters are frozen: training "
                "them with a loop over layers instead of all layers at once.",
                stacklevel=3,
            )
        stacked = [_stacked_method(type(first), method) for method in self.loss_methods] if uniform else []
        self._stacked_losses = stacked if stacked and all(f is not None for f in stacked) else None
        self._stacked_probe = _stacked_method(type(first), "probe_logits") if self.has_probe else None
        self.vectorized = (
            bool(config.vectorize)
            and self._stacked_losses is not None
            and (not self.has_probe or self._stacked_probe is not None)
        )
        if config.vectorize and uniform and not self.vectorized:
            absent = [f"stacked_{method}" for method, fn in zip(self.loss_methods, stacked, strict=True) if fn is None]
            if self.has_probe and self._stacked_probe is None:
                absent.append("stacked_probe_logits")
            warnings.warn(
                f"{type(first).__name__} has no {', '.join(absent)}: training loops over its {len(self.layers)} "
                "layers one by one (the reference path, slower); define them for the batched path or set "
                "train.vectorize=false to say the loop is meant.",
                stacklevel=3,
            )
        if self.vectorized:
            # Frozen parameters are stacked too (without gradients): they may differ per layer.
            frozen = [n for n, _ in first.named_parameters() if n not in self.names]
            self.transposed = {n: dict(first.named_parameters())[n].dim() == 2 for n in self.names + frozen}
            with torch.no_grad():
                self.stacked = {}
                for n in self.names + frozen:
                    per_layer = [dict(self.modules[layer].named_parameters())[n].detach() for layer in self.layers]
                    if self.transposed[n]:
                        per_layer = [p.T for p in per_layer]
                    self.stacked[n] = (
                        torch.stack(per_layer)
                        .to(device=self.device, dtype=self.dtype)
                        .contiguous()
                        .requires_grad_(n in self.names)
                    )
        else:
            for module in self.modules.values():
                module.to(device=self.device, dtype=self.dtype)

    def _stacked_view(self, n: str, i: int) -> torch.Tensor:
        """Layer i's slice of parameter n, in the module's layout (a view: writes go through)."""
        t = self.stacked[n][i]
        return t.transpose(-1, -2) if self.transposed[n] else t

    def _layer_params(self, layer: int) -> List[torch.Tensor]:
        named = dict(self.modules[layer].named_parameters())
        return [named[n] for n in self.names_by_layer[layer]]

    @property
    def num_examples(self) -> int:
        return self.train_data.num_pairs

    def parameters(self) -> List[torch.Tensor]:
        if self.vectorized:
            return [self.stacked[n] for n in self.names]
        return [p for layer in self.layers for p in self._layer_params(layer)]

    def train_mode(self, training: bool) -> None:
        for module in self.modules.values():
            module.train(training)

    # -- steps
    def _accuracy(self, logits: torch.Tensor, n_pos: int) -> torch.Tensor:
        """Per-layer probe accuracy of logits (L, 2n) for [h⁺; h⁻]: w·h > 0 ⇔ positive."""
        labels = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        labels[:n_pos] = True
        return ((logits > 0) == labels).to(torch.float64).mean(-1)

    def _layer_losses(self, hp: torch.Tensor, hn: torch.Tensor) -> torch.Tensor:
        """Each layer's loss (the sum of the trained terms), (L,), from h⁺, h⁻ (L, n, d): one
        stacked call per term, or each module's own methods."""
        if self.vectorized:  # vectorized only with stacked losses
            stacked = cast(List[Callable[..., torch.Tensor]], self._stacked_losses)
            total = stacked[0](self.stacked, hp, hn)
            for fn in stacked[1:]:
                total = total + fn(self.stacked, hp, hn)
            return total

        def layer_loss(module: nn.Module, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
            total = getattr(module, self.loss_methods[0])(h_pos, h_neg)
            for method in self.loss_methods[1:]:
                total = total + getattr(module, method)(h_pos, h_neg)
            return total

        return torch.stack([layer_loss(self.modules[layer], hp[i], hn[i]) for i, layer in enumerate(self.layers)])

    @torch.no_grad()
    def _layer_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Every layer's probe logits, (L, n), from h (L, n, d)."""
        if self.vectorized:  # called with probes only, and vectorized then only with a stacked probe
            return cast(Callable[..., torch.Tensor], self._stacked_probe)(self.stacked, h)
        modules: Dict[int, Any] = self.modules  # each has probe_logits (has_probe)
        return torch.stack([modules[layer].probe_logits(h[i]) for i, layer in enumerate(self.layers)])

    def loss(self, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        hp, hn = self.train_data.gather(self.layers, idx, self.device, self.dtype)
        losses = self._layer_losses(hp, hn)
        shown: Dict[str, float] = {"loss": float(losses.detach().double().mean())}  # one host sync per step
        if self.shows_accuracy:
            shown["acc"] = float(self._accuracy(self._layer_logits(torch.cat([hp, hn], 1)), hp.shape[1]).mean())
        # the sum: each layer's parameters get exactly the gradient of their own layer's loss
        return losses.sum(), shown

    def clip_(self, max_norm: float) -> None:
        """Scale each layer's gradient to norm ≤ max_norm: g ← g · min(1, max_norm / (‖g‖ + 1e-6))."""
        if self.vectorized:
            grads = [g for g in (self.stacked[n].grad for n in self.names) if g is not None]
            if not grads:
                return
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
            total = torch.linalg.vector_norm(norms, dim=0)
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))
            return
        for layer in self.layers:
            grads = [g for g in (p.grad for p in self._layer_params(layer)) if g is not None]
            if not grads:
                continue
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(-1)) for g in grads])
            total = torch.linalg.vector_norm(norms)
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, Any]]:
        data = self.eval_data
        if data is None:
            return None
        n = data.num_pairs
        chunk = self.config.eval_batch_size
        loss_sum = torch.zeros(len(self.layers), dtype=torch.float64)
        correct = torch.zeros(len(self.layers), dtype=torch.float64)
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            hp, hn = data.gather(self.layers, idx, self.device, self.dtype)
            b = len(idx)
            loss_sum += self._layer_losses(hp, hn).double().cpu() * b
            if self.metric == "probe_accuracy":
                correct += self._accuracy(self._layer_logits(torch.cat([hp, hn], 1)), b).cpu() * 2 * b
        losses = loss_sum / n
        if self.metric == "probe_accuracy":
            scores = correct / (2 * n)
            metric = "probe_accuracy"
        else:
            scores = -losses
            metric = "neg_eval_loss"
        return {
            "metric": metric,
            "score": float(scores.mean()),
            "eval_loss": float(losses.mean()),
            "layer_scores": {layer: float(scores[i]) for i, layer in enumerate(self.layers)},
        }

    # -- state
    def state_dict(self) -> Dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            for n, p in zip(self.names_by_layer[layer], self._layer_tensors(i, layer), strict=True):
                out[f"{layer}.{n}"] = p.detach().cpu().clone(memory_format=torch.contiguous_format)
        return out

    def _layer_tensors(self, i: int, layer: int) -> List[torch.Tensor]:
        if self.vectorized:
            return [self._stacked_view(n, i) for n in self.names]
        return self._layer_params(layer)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            for n, target in zip(self.names_by_layer[layer], self._layer_tensors(i, layer), strict=True):
                key = f"{layer}.{n}"
                if key in state:
                    target.copy_(state[key])

    def layer_keys(self, layer: int) -> List[str]:
        return [f"{layer}.{n}" for n in self.names_by_layer[layer]]

    def fingerprint(self) -> dict:
        shapes = {
            f"{layer}.{n}": list(p.shape)
            for layer, m in self.modules.items()
            for n, p in m.named_parameters()
            if n in self.names_by_layer[layer]
        }
        return {
            "task": self.name,
            "loss": self.loss_method,
            "layers": self.layers,
            "num_pairs": self.num_examples,
            "width": self.train_data.width,
            "modules": sorted({type(m).__name__ for m in self.modules.values()}),
            "vectorized": self.vectorized,
            "parameters": shapes,
            "fixed": _fixed_digest(self.modules),
        }

    @torch.no_grad()
    def finalize(self) -> Dict[int, nn.Module]:
        """Write the trained weights back into one module per layer (on the modules' device)."""
        for i, layer in enumerate(self.layers):
            module = self.modules[layer]
            if self.vectorized:
                named = dict(module.named_parameters())
                for n in self.names:
                    named[n].copy_(self._stacked_view(n, i))
            else:
                module.to(device=self.home, dtype=self.home_dtype)
        return self.modules


def _fixed_digest(modules: Mapping[int, nn.Module]) -> Optional[str]:
    """SHA-256 of the modules' fixed parameters (a resumed training must start from the same)."""
    digest, found = hashlib.sha256(), False
    for layer in sorted(modules):
        for name in getattr(modules[layer], "fixed_parameters", ()):
            value = modules[layer].get_parameter(name).detach().to("cpu", torch.float64)
            digest.update(f"{layer}.{name}".encode())
            digest.update(value.contiguous().numpy().tobytes())
            found = True
    return digest.hexdigest() if found else None


# ---------------------------------------------------------------------------------------- loop
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


def make_optimizer(params: Sequence[torch.Tensor], config: TrainSettings) -> torch.optim.AdamW:
    """AdamW over ``params``; the fused kernel where torch has one for them (one pass over each
    tensor instead of one per operation), else the default implementation. The update is
    elementwise, so stacking layers changes nothing."""
    kwargs: Dict[str, Any] = dict(
        lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the examples in ``epoch`` (0-based): a function of (seed, epoch) only."""
    return torch.from_numpy(np.random.default_rng([int(seed), int(epoch)]).permutation(n))


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def run_training(
    task: TrainingObjective, config: TrainSettings, callbacks: Sequence[Callable[[EpochRecord], None]] = ()
) -> TrainResult:
    """Run the training loop described in the module docstring on ``task``.

    ``callbacks`` are called with each epoch's :class:`EpochRecord` after its checkpoint is
    written (an exception raised there stops training; the run resumes from that checkpoint).
    """
    threads = torch.get_num_threads()
    on_cpu = isinstance(task, PairObjective) and task.device.type == "cpu"
    wanted = config.cpu_threads
    if wanted is None and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        wanted = 1
    if on_cpu and wanted is not None:
        torch.set_num_threads(wanted)
    try:
        return _run_training(task, config, callbacks)
    finally:
        torch.set_num_threads(threads)


def _run_training(
    task: TrainingObjective, config: TrainSettings, callbacks: Sequence[Callable[[EpochRecord], None]]
) -> TrainResult:
    started = time.perf_counter()
    n = task.num_examples
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = math.ceil(total * config.warmup_ratio)
    if config.best_by == "layer" and not task.per_layer:
        raise ValueError("best_by='layer' needs per-layer scores (cached-activation training).")
    optimizer = make_optimizer(task.parameters(), config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule)
    )
    fingerprint = {"config": config.fingerprint(), "task": task.fingerprint()}

    history: List[EpochRecord] = []
    best: Dict[str, Any] = {"score": None, "epoch": None, "state": None, "layer_scores": None, "layer_epochs": {}}
    start_epoch, step, resumed_from = 0, 0, None
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("fingerprint") != fingerprint:
            raise ValueError(
                f"the checkpoint in {config.checkpoint_dir} belongs to a different training (other data, modules "
                "or hyperparameters); use another checkpoint_dir or resume=False to start over."
            )
        task.load_state_dict(saved["task"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        history = [EpochRecord(**r) for r in saved["history"]]
        best = saved["best"]
        start_epoch = resumed_from = int(saved["epoch"])
        step = int(saved["step"])

    bar = None
    try:
        for epoch in range(start_epoch, config.stop_after_epoch or config.epochs):
            t0 = time.perf_counter()
            task.train_mode(True)
            order = epoch_permutation(n, config.seed, epoch)
            bar = _progress(steps_per_epoch, f"{task.name} epoch {epoch + 1}/{config.epochs}", config.progress)
            loss_sum, acc_sum, acc_count = 0.0, 0.0, 0
            for s in range(steps_per_epoch):
                idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss, shown = task.loss(idx)
                if loss is not None:
                    loss.backward()
                if config.max_grad_norm is not None:
                    task.clip_(config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += shown["loss"]
                if "acc" in shown:
                    acc_sum += shown["acc"]
                    acc_count += 1
                postfix = {"loss": f"{loss_sum / (s + 1):.4f}"}
                if acc_count:
                    postfix["acc"] = f"{acc_sum / acc_count:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            task.train_mode(False)
            metrics = task.evaluate()
            if metrics is not None:
                postfix[f"eval_{metrics['metric']}"] = f"{metrics['score']:.4f}"
                bar.set_postfix(postfix, refresh=True)
            bar.close()
            bar = None
            record = EpochRecord(
                epoch=epoch + 1,
                step=step,
                train_loss=loss_sum / steps_per_epoch,
                train_accuracy=acc_sum / acc_count if acc_count else None,
                eval_loss=None if metrics is None else metrics["eval_loss"],
                score=None if metrics is None else metrics["score"],
                metric=None if metrics is None else metrics["metric"],
                layer_scores=None if metrics is None else metrics["layer_scores"],
                learning_rate=float(optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - t0,
            )
            history.append(record)
            if metrics is not None and config.select_best:
                _update_best(best, record, task, config)
            if ckpt_path is not None:
                write_atomic(
                    ckpt_path,
                    functools.partial(
                        torch.save,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "fingerprint": fingerprint,
                            "epoch": epoch + 1,
                            "step": step,
                            "task": task.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": torch.get_rng_state(),
                            "history": [asdict(r) for r in history],
                            "best": best,
                        },
                    ),
                )
            for callback in callbacks:
                callback(record)
        # Restore the selected weights.
        layer_scores = history[-1].layer_scores if history else None
        best_epoch, best_score = None, None
        layer_best_epochs = None
        if best["state"] is not None:
            task.load_state_dict(best["state"])
            best_epoch, best_score, layer_scores = best["epoch"], best["score"], best["layer_scores"]
            if config.best_by == "layer":
                layer_best_epochs = {int(k): int(v) for k, v in best["layer_epochs"].items()}
        modules = task.finalize()
    finally:
        if bar is not None:
            bar.close()
        task.close()
    return TrainResult(
        modules=modules,
        history=history,
        best_epoch=best_epoch,
        best_score=best_score,
        metric=history[-1].metric if history else None,
        layer_scores=layer_scores,
        layer_best_epochs=layer_best_epochs,
        steps=step,
        seconds=time.perf_counter() - started,
        resumed_from_epoch=resumed_from,
        config=config,
    )


def _update_best(best: Dict[str, Any], record: EpochRecord, task: TrainingObjective, config: TrainSettings) -> None:
    """Keep the weights of the best epoch so far (strictly better score; ties keep the earlier)."""
    if config.best_by == "mean":
        if best["score"] is None or record.score > best["score"]:
            best.update(
                score=record.score,
                epoch=record.epoch,
                state=task.state_dict(),
                layer_scores=dict(record.layer_scores) if record.layer_scores else None,
            )
        return
    state = task.state_dict()
    if best["state"] is None:
        best["state"] = {}
        best["layer_scores"] = {}
    for layer, score in cast(Dict[int, float], record.layer_scores).items():  # best_by="layer": per-layer scores
        previous = best["layer_scores"].get(layer)
        if previous is None or score > previous:
            best["layer_scores"][layer] = score
            best["layer_epochs"][layer] = record.epoch
            for key in task.layer_keys(layer):
                best["state"][key] = state[key]
    best["score"] = float(np.mean(list(best["layer_scores"].values())))
    best["epoch"] = max(best["layer_epochs"].values())


# --------------------------------------------------------------------------------- entry points
def new_interventions(method, width: int, layers: Sequence[int], *, seed: int = 0, **arguments) -> Dict[int, nn.Module]:
    """Fresh (untrained) interventions of a trained method, one per layer, width ``width``.

    Created in ascending layer order right after ``torch.manual_seed(seed)`` (the global RNG state
    is restored afterwards), so the same seed gives the same initial weights. ``arguments`` go to
    the intervention's constructor (e.g. ``HPRSettings.intervention_arguments()``).
    """
    spec = method_spec(method) if isinstance(method, str) else method
    layers = sorted(int(x) for x in layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct layer indices, got {layers}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {layer: spec.intervention(embed_dim=int(width), **arguments) for layer in layers}


def train_interventions(
    modules: Mapping[int, nn.Module],
    train: PairedActivations,
    eval_data: Optional[PairedActivations] = None,
    config: Optional[TrainSettings] = None,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
) -> TrainResult:
    """Train one intervention per layer (each with a ``loss(h_pos, h_neg)`` method) on cached
    activation pairs, every loss term together; see the module docstring. Modules are updated in
    place and returned in ``TrainResult.modules``. Select layers afterwards with
    :func:`actedit.train.select.select_layers`. Modules that declare ``fixed_parameters`` are
    prepared from ``train`` first (:func:`prepare_interventions`)."""
    config = config or TrainSettings()
    prepare_interventions(modules, train)
    return run_training(PairObjective(modules, train, eval_data, config), config, callbacks)


def _train_only(modules: Mapping[int, nn.Module], prefix: Optional[str]) -> None:
    """Make only the parameters whose name starts with ``prefix`` trainable (None: all but the
    class's declared ``fixed_parameters``, which are never trained)."""
    for module in modules.values():
        fixed = set(getattr(module, "fixed_parameters", ()))
        for name, param in module.named_parameters():
            param.requires_grad_(name not in fixed and (prefix is None or name.startswith(prefix)))


PREPARE_PAIRS = 8192
"""At most this many training pairs (evenly spaced; their positive and negative rows) are what
:func:`prepare_interventions` hands each module's ``prepare``."""


def prepare_interventions(modules: Mapping[int, nn.Module], train: PairedActivations) -> None:
    """Set each module's declared ``fixed_parameters`` from its layer's training activations
    (``module.prepare(h)``, h the positive and negative rows of at most :data:`PREPARE_PAIRS`
    evenly spaced pairs), before training. Modules that declare none are left as they are."""
    # a layer the data lacks, or a width it does not have, is left to the objective's own error
    needs = [
        layer
        for layer, module in modules.items()
        if getattr(module, "fixed_parameters", ())
        and layer in train.positive
        and int(getattr(module, "embed_dim", None) or train.width) == train.width
    ]
    if not needs:
        return
    n = train.num_pairs
    idx = torch.linspace(0, n - 1, steps=min(n, PREPARE_PAIRS)).round().long().unique()
    for layer in needs:
        pos, neg = train.gather([layer], idx)
        cast(Any, modules[layer]).prepare(torch.cat([pos[0], neg[0]]))


def train_top_layers(
    modules: Mapping[int, nn.Module],
    train: PairedActivations,
    eval_data: Optional[PairedActivations],
    *,
    k: int = 5,
    config: Optional[TrainSettings] = None,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
    keep_layers: str = "selected",
) -> Tuple[TrainResult, LayerSelection]:
    """Train a method as its class's ``training_recipe`` declares: the selecting loss term on every
    layer, the layer selection, then the other terms. Returns ``(TrainResult, LayerSelection)``.

    The recipe (:class:`~actedit.interventions.registry.TrainingRecipe`) names the loss terms
    (each a loss method and the parameters it trains), the selecting term and the selection
    (HPR: ``probe_loss`` trains the probe w, ``angle_loss`` the angle net f, layers by eval probe
    accuracy). The terms have disjoint parameters and AdamW acts per parameter, so when each
    term's gradient is also clipped on its own, every module follows exactly the trajectory of
    joint training. Hence:

    0. prepare the modules' declared fixed parameters from ``train`` (:func:`prepare_interventions`);
    1. train the selecting term of all layers (the others frozen); keep the best epoch E* by the
       mean eval score (probe accuracy, or −eval loss);
    2. select the top ``k`` layers by the recipe's selection at E*
       (:func:`actedit.train.select.select_layers`; ``fixed``: every layer);
    3. train each other term, in order, on the selected layers only (``keep_layers="all"``: on
       every layer), for the first E* epochs of the same schedule and batch order
       (``stop_after_epoch``).

    Each term checkpoints in its own folder (``checkpoint_dir/<term>``), so an interrupted run
    resumes in the term it stopped in. The selected modules equal what :func:`train_interventions`
    would give them if it clipped each term separately (it clips all of a layer's parameters
    together). ``TrainResult.modules`` holds the selected layers (every layer with
    ``keep_layers="all"``); ``layer_scores`` the selecting stage's eval score of every layer; the
    history is the stages' epochs in order.
    """
    config = config or TrainSettings()
    if keep_layers not in ("selected", "all"):
        raise ValueError(f"keep_layers must be 'selected' or 'all', got {keep_layers!r}.")
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError("modules must be a non-empty mapping layer -> trainable intervention.")
    cls = type(next(iter(modules.values())))
    recipe = _recipe(cls)
    if recipe is None:
        raise ValueError(
            f"{cls.__name__} declares no training_recipe (its loss terms and layer selection); "
            "train it with train_interventions."
        )
    if recipe.selection != "fixed" and not isinstance(eval_data, PairedActivations):
        raise ValueError(
            f"{cls.__name__} selects layers by {recipe.selection} on eval data: pass eval_data (PairedActivations)."
        )
    if not 1 <= k <= len(modules):
        raise ValueError(f"k must be between 1 and the number of layers ({len(modules)}), got {k}.")
    if config.best_by != "mean" or (not config.select_best and eval_data is not None):
        raise ValueError(
            "train_top_layers keeps one best epoch for all layers (best_by='mean', select_best=True); "
            "use train_interventions for other settings."
        )
    selecting, rest = recipe.selecting, recipe.rest
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    prepare_interventions(modules, train)
    try:
        _train_only(modules, selecting.trains)
        first_config = dataclasses.replace(
            config, checkpoint_dir=str(ckpt / selecting.method) if ckpt else None, select_best=eval_data is not None
        )
        first = run_training(
            PairObjective(modules, train, eval_data, first_config, loss_method=selecting.method),
            first_config,
            callbacks,
        )
        trained = cast(Dict[int, nn.Module], first.modules)  # cached-activation training returns its modules
        selection = select_layers(trained, eval_data, k=k, metric=recipe.selection, loss_method=selecting.method)
        chosen = trained if keep_layers == "all" else {layer: trained[layer] for layer in selection.selected}
        history, steps, seconds, last = list(first.history), first.steps, first.seconds, first
        for term in rest:
            _train_only(chosen, term.trains)
            term_config = dataclasses.replace(
                config,
                checkpoint_dir=str(ckpt / term.method) if ckpt else None,
                select_best=False,
                stop_after_epoch=first.best_epoch or config.stop_after_epoch,
            )
            last = run_training(
                PairObjective(chosen, train, eval_data, term_config, loss_method=term.method), term_config, callbacks
            )
            history += last.history
            steps += last.steps
            seconds += last.seconds
    finally:
        _train_only(modules, None)
    result = TrainResult(
        modules=last.modules if rest else chosen,
        history=history,
        best_epoch=first.best_epoch,
        best_score=first.best_score,
        metric=first.metric,
        layer_scores=first.layer_scores,
        layer_best_epochs=first.layer_best_epochs,
        steps=steps,
        seconds=seconds,
        resumed_from_epoch=first.resumed_from_epoch,
        config=config,
    )
    return result, selection


__all__ = [
    "BEST_BY",
    "CHECKPOINT_NAME",
    "EpochRecord",
    "PairObjective",
    "SCHEDULES",
    "TrainSettings",
    "TrainResult",
    "TrainingObjective",
    "epoch_permutation",
    "lr_factor",
    "make_optimizer",
    "new_interventions",
    "prepare_interventions",
    "run_training",
    "train_interventions",
    "train_top_layers",
]
