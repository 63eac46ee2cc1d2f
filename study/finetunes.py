"""Fine-tuning rows of a study: baselines that change the model's weights instead of editing its
activations (the HPR paper's LoRA row), scored by the same scorer and analyses as the edits.

A row ``lora: {method: lora, settings: {...}}`` of a study's ``methods`` trains a LoRA adapter
(:mod:`actedit.train.lora`) on the training split of the row's data (the same questions and
responses the edits learn from), once per seed of ``seeds`` (its ``settings.seed``), and saves it
as a PEFT directory under ``artifacts/<row>[/seed<s>]`` (``peft.PeftModel.from_pretrained`` loads
it). For scoring, the adapter is loaded onto a copy of the base model, so the base model and the
activation edits never run it.

Each kind is one :class:`FinetuneSpec` in :data:`FINETUNES`, found by its name like a method.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type

from actedit.data.tasks import load_contrast
from actedit.interventions.settings import Settings
from actedit.train import lora


@dataclass(frozen=True)
class FinetuneSpec:
    """A kind of fine-tuning row.

    Attributes:
        name: what ``methods.<row>.method`` says (``lora``).
        title: its full name, for reports.
        settings_class: its settings (unknown keys are errors); must have a ``seed`` field.
        train: ``train(model, tokenizer, dataset, settings, out, progress)``: trains on ``dataset``
            and saves to ``out`` atomically.
        load: ``load(model, out)``: the fine-tuned model, on (a copy of) ``model``.
        metadata: ``metadata(out)``: the record saved with the result (settings, losses, seconds).
        weights: the files whose contents identify a saved result (cached scores follow them).
    """

    name: str
    title: str
    settings_class: Type[Settings]
    train: Callable[..., Any]
    load: Callable[[Any, Path], Any]
    metadata: Callable[[Path], Dict[str, Any]]
    weights: tuple = ()

    def settings(self, values: Any, where: str) -> Settings:
        return self.settings_class.from_mapping(values, where)

    def ready(self, out: Path) -> bool:
        """Whether ``out`` holds a complete saved result (saves are atomic: present means complete)."""
        return all((out / name).is_file() for name in self.weights)

    def identity(self, out: Path) -> Optional[str]:
        """SHA-256 over the result's files (None when it is not saved)."""
        if not self.ready(out):
            return None
        digest = hashlib.sha256()
        for name in self.weights:
            digest.update((out / name).read_bytes())
        return digest.hexdigest()


def _train_lora(model, tokenizer, dataset, settings, out: Path, progress: bool) -> Any:
    return lora.train_lora(model, tokenizer, dataset, settings, out_dir=out, progress=progress)


def _load_lora(model, out: Path) -> Any:
    return lora.load_lora(copy.deepcopy(model), out)


FINETUNES: Dict[str, FinetuneSpec] = {
    "lora": FinetuneSpec(
        name="lora",
        title="LoRA fine-tuning with PEFT (Hu et al., 2022; the HPR paper's LoRA baseline)",
        settings_class=lora.LoRASettings,
        train=_train_lora,
        load=_load_lora,
        metadata=lora.lora_metadata,
        weights=(lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, lora.METADATA_FILE),
    )
}
"""Fine-tuning kinds a study row may name in ``method``."""


def effect_path(out: Path) -> Path:
    """Where a fine-tuning run's measured effect is kept: beside its saved weights, not in them."""
    return out.parent / f"{out.name}_effect.json"


def finetune_info(spec: FinetuneSpec, out: Path) -> Dict[str, Any]:
    """What a study reports of a fine-tuning run, in the shape of an artifact's metadata: one
    ``edits`` entry (no site, no layers), the measured ``effect`` and the ``training`` record."""
    effect = json.loads(effect_path(out).read_text()) if effect_path(out).is_file() else {}
    return {
        "edits": [{"method": spec.name, "component": None, "layers": []}],
        "training": spec.metadata(out),
        **effect,
    }


def finetune_dataset(data) -> Any:
    """The contrast data a fine-tuning row trains on (the study's or the row's ``data``): the
    same loader, source, split file and limit as the edits' collection."""
    return load_contrast(data.name, source=data.source, split_file=data.split_file, limit=data.limit)


__all__ = ["FINETUNES", "FinetuneSpec", "effect_path", "finetune_dataset", "finetune_info"]
