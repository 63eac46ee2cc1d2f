"""End-to-end training of a ``pyvene.IntervenableModel``'s interventions with the LM loss.

The interventions are trained with −(1/|C|) Σ_{t∈C} log p(x_t | x_<t) over the completion tokens
C (labels = −100 elsewhere), the base model frozen, by the loop of :mod:`actedit.train.trainer`.
Parameters come from ``IntervenableModel.get_trainable_parameters()``, de-duplicated (it lists
linked parameters once per use). Any ``pyvene.TrainableIntervention`` plugs in without a new loop.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import pyvene as pv
import torch
import torch.nn.functional as F
from torch import nn

from actedit.interventions.devices import input_device

from .trainer import EpochRecord, TrainingObjective, TrainResult, TrainSettings, run_training

IGNORE_INDEX = -100


def trainable_parameters(pvm: pv.IntervenableModel) -> List[Tuple[str, torch.Tensor]]:
    """``pvm.get_trainable_parameters()`` de-duplicated, with names.

    pyvene lists a parameter once per intervention that uses it (linked interventions share
    modules) and appends the base model's parameters that require gradients. Names are
    ``<intervention key>.<parameter name>`` (first use) or ``model.<name>``.
    """
    names: Dict[int, str] = {}
    for key, intervention in pvm.interventions.items():
        for name, p in intervention.named_parameters():
            names.setdefault(id(p), f"{key}.{name}")
    for name, p in pvm.model.named_parameters():
        names.setdefault(id(p), f"model.{name}")
    seen: Set[int] = set()
    out: List[Tuple[str, torch.Tensor]] = []
    for p in pvm.get_trainable_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        out.append((names.get(id(p), f"param{len(out)}"), p))
    return out


def lm_examples(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_token_id: int
) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for prompt + completion pairs.

    ``labels`` equal the completion's token ids and −100 on the prompt and padding, so the
    language-model loss covers the completion tokens only.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"need one completion per prompt and at least one example, got {len(prompts)} prompts "
            f"and {len(completions)} completions."
        )
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        p, c = [int(t) for t in p], [int(t) for t in c]
        if not c:
            raise ValueError(f"example {i} has an empty completion; nothing to train on.")
        rows.append((p, c))
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_lm_data(data: Any, name: str) -> Dict[str, torch.Tensor]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{name} must be a mapping with input_ids, attention_mask and labels (see lm_examples).")
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in data]
    if missing:
        raise ValueError(f"{name} lacks {missing}; build it with lm_examples().")
    out = {k: torch.as_tensor(data[k]).long() for k in ("input_ids", "attention_mask", "labels")}
    shape = out["input_ids"].shape
    if len(shape) != 2 or shape[0] == 0 or shape[1] < 2:
        raise ValueError(f"{name}['input_ids'] must be (N >= 1, T >= 2), got {tuple(shape)}.")
    for k, v in out.items():
        if v.shape != shape:
            raise ValueError(f"{name}['{k}'] has shape {tuple(v.shape)} but input_ids has {tuple(shape)}.")
    if not bool((out["labels"][:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(f"{name} has no completion tokens to score (every label is -100 after the first position).")
    return out


def _trim(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop columns that are padding in every row."""
    used = batch["attention_mask"].bool().any(0)
    if bool(used.all()) or not bool(used.any()):
        return batch
    cols = torch.nonzero(used).flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return {k: v[:, lo:hi] for k, v in batch.items()}


def lm_batch_loss(
    pvm: pv.IntervenableModel, batch: Mapping[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Language-model loss of the intervened model on the labelled tokens of ``batch``.

    −(1/|C|) Σ_{t∈C} log p(x_t | x_<t) with C the positions whose label is not −100 (next-token
    targets: the logits at t − 1 predict the label at t). ``reduction='sum'`` returns the sum.
    """
    _, out = pvm({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    logits = out.logits[:, :-1]
    targets = batch["labels"][:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


@torch.no_grad()
def evaluate_lm(pvm: pv.IntervenableModel, data: Mapping[str, Any], batch_size: int = 16) -> float:
    """Token-weighted mean LM loss of the intervened model over the completion tokens of ``data``."""
    data = _check_lm_data(data, "data")
    device = input_device(pvm.model)
    total, count = 0.0, 0
    n = data["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        batch = _trim({k: v[start : start + batch_size].to(device) for k, v in data.items()})
        total += float(lm_batch_loss(pvm, batch, reduction="sum"))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


class LMTask(TrainingObjective):
    """Train the interventions of an ``IntervenableModel`` with the LM loss on completions."""

    name = "lm"

    def __init__(
        self,
        pvm: pv.IntervenableModel,
        train: Mapping[str, Any],
        eval_data: Optional[Mapping[str, Any]],
        config: TrainSettings,
    ) -> None:
        if not isinstance(pvm, pv.IntervenableModel):
            raise ValueError(f"pvm must be a pyvene.IntervenableModel, got {type(pvm).__name__}.")
        self.pvm, self.config = pvm, config
        self.train_data = _check_lm_data(train, "train")
        self.eval_data = None if eval_data is None else _check_lm_data(eval_data, "eval_data")
        self.named = trainable_parameters(pvm)
        if not self.named:
            raise ValueError(
                "the IntervenableModel has no trainable parameters: its interventions must be "
                "pyvene TrainableInterventions with parameters."
            )
        self.device = input_device(pvm.model)  # batches follow the model (its embedding, under a device_map)

    @property
    def num_examples(self) -> int:
        return int(self.train_data["input_ids"].shape[0])

    def parameters(self) -> List[torch.Tensor]:
        return [p for _, p in self.named]

    def train_mode(self, training: bool) -> None:
        for intervention in self.pvm.interventions.values():
            if isinstance(intervention, nn.Module):
                intervention.train(training)

    def loss(self, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        batch = _trim({k: v[idx].to(self.device) for k, v in self.train_data.items()})
        loss = lm_batch_loss(self.pvm, batch)
        return loss, {"loss": float(loss.detach())}

    def clip_(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    def evaluate(self) -> Optional[Dict[str, Any]]:
        if self.eval_data is None:
            return None
        loss = evaluate_lm(self.pvm, self.eval_data, self.config.eval_batch_size)
        return {"metric": "neg_eval_loss", "score": -loss, "eval_loss": loss, "layer_scores": None}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.named}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.named:
            if name in state:
                p.copy_(state[name])

    def layer_keys(self, layer: int) -> List[str]:
        raise ValueError("best_by='layer' needs per-layer scores; end-to-end training has one score.")

    def fingerprint(self) -> dict:
        return {
            "task": self.name,
            "num_examples": self.num_examples,
            "seq_len": int(self.train_data["input_ids"].shape[1]),
            "parameters": {name: list(p.shape) for name, p in self.named},
        }


def train_lm(
    pvm: pv.IntervenableModel,
    train: Mapping[str, Any],
    eval_data: Optional[Mapping[str, Any]] = None,
    config: Optional[TrainSettings] = None,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
) -> TrainResult:
    """Train ``pvm``'s interventions end-to-end with the LM loss on completion tokens.

    ``train`` / ``eval_data``: ``{"input_ids", "attention_mask", "labels"}`` tensors (N, T) as
    built by :func:`lm_examples` (labels −100 outside the completions). The base model stays
    frozen (pyvene freezes it when wrapping); the best epoch is the one with the lowest eval loss.
    """
    config = config or TrainSettings()
    return run_training(LMTask(pvm, train, eval_data, config), config, callbacks)


__all__ = ["IGNORE_INDEX", "LMTask", "evaluate_lm", "lm_batch_loss", "lm_examples", "train_lm", "trainable_parameters"]
