"""The one-call Python API: from texts to an edited ``pyvene.IntervenableModel`` for any method.

::

    import actedit
    pvm = actedit.fit("caa", model, tokenizer, pairs, layers=[12], multiplier=4.0)
    actedit.save(pvm, "caa-edit")                  # stock pv.IntervenableModel.load("caa-edit", model) works
    both = actedit.compose(pvm, "hpr-edit")        # intervenable models or artifact directories

:func:`fit` runs the same steps as ``actedit fit`` / ``actedit train``
(:mod:`actedit.train.pipeline`): the method's prompt format, activations collected in memory (or
in a resumable store directory), its closed-form fit or its training, and the method's settings
validated against its settings class (a mistyped keyword is an error listing the valid ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import pyvene as pv

from actedit.data.contrast import ContrastDataset, ContrastExample, PromptPair, PromptPairDataset, as_dataset
from actedit.data.tasks import contrast_names, is_contrast_name
from actedit.interventions.artifacts import load_artifact, save_artifact
from actedit.interventions.edits import compose as compose_configs
from actedit.interventions.edits import config_of, intervenable, is_intervenable
from actedit.interventions.registry import method_spec
from actedit.train.pipeline import (
    CollectSettings,
    DataSettings,
    PipelineConfig,
    collect,
    load_dataset,
    make_edit,
    method_settings,
    prepare_dataset,
)

Data = Union[str, ContrastDataset, PromptPairDataset, Sequence[Any]]


def examples_dataset(data: Data, reads_pairs: bool):
    """A dataset from the user's data: (prompt, positive, negative) triples, (prompt₁, prompt₂)
    pairs, examples, or a dataset."""
    if isinstance(data, (ContrastDataset, PromptPairDataset)):
        return data
    items = list(data)
    if not items:
        raise ValueError(
            "the data is empty; give (prompt, positive, negative) triples, prompt pairs such as "
            "[('Love', 'Hate')], a dataset, or a task name."
        )
    if all(isinstance(x, (ContrastExample, PromptPair)) for x in items):
        return as_dataset(items)
    if not all(isinstance(x, (tuple, list)) and all(isinstance(t, str) for t in x) for x in items):
        raise ValueError(
            "each item of the data must be a (prompt, positive, negative) triple of strings, or "
            "a (prompt1, prompt2) pair for ActAdd, or a ContrastExample / PromptPair."
        )
    lengths = {len(x) for x in items}
    if lengths == {2}:
        return PromptPairDataset([PromptPair(a, b, {"id": i}) for i, (a, b) in enumerate(items)], name="prompt_pairs")
    if lengths == {3}:
        return ContrastDataset(
            [ContrastExample(p, [pos], [neg], {"id": i}) for i, (p, pos, neg) in enumerate(items)], name="triples"
        )
    kind = "(prompt1, prompt2) pairs" if reads_pairs else "(prompt, positive, negative) triples"
    raise ValueError(f"the data mixes items of lengths {sorted(lengths)}; give {kind}.")


def fit(
    method: str,
    model,
    tokenizer,
    data: Data,
    *,
    layers=None,
    store: Optional[Union[str, Path]] = None,
    train: Optional[Mapping[str, Any]] = None,
    source: Optional[str] = None,
    split_file: Optional[str] = None,
    limit: Optional[int] = None,
    eval_ratio: float = 0.1,
    seed: int = 0,
    prompt_format: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    **settings,
) -> pv.IntervenableModel:
    """Fit (or train) ``method`` on ``model`` from ``data``; returns the edited ``IntervenableModel``.

    Args:
        method: a registered method name (``hpr``, ``sea``, ``iti``, ``caa``, ``actadd``).
        model, tokenizer: a transformers causal LM and its tokenizer.
        data: ``(prompt, positive, negative)`` triples; for ActAdd ``(prompt₁, prompt₂)`` pairs such
            as ``[("Love", "Hate")]``; a :class:`~actedit.data.contrast.ContrastDataset`; or a
            registered task name (``"truthfulqa"``: its train and eval questions; ``source`` and
            ``split_file`` say where they are).
        layers: the layers the method works on (a layer spec: ``[12]``, ``0.4``, ``"1/3:"``, ...;
            default the method's: all for HPR, SEA and ITI; CAA and ActAdd need it).
        store: a directory for a resumable activation store (large data); default in memory.
        train: training settings of a trained method (:class:`~actedit.train.trainer.TrainSettings`
            fields, e.g. ``{"epochs": 3}``).
        source, split_file, limit: where a task's questions are, and how many per split.
        eval_ratio, seed: the seeded train/eval split of data without one (methods that select
            layers or heads on eval data), and the seed of format conversions.
        prompt_format: parameters of the method's prompt format (:mod:`actedit.data.formats`).
        progress: show progress bars.
        **settings: the method's settings (see its settings class, e.g.
            :class:`~actedit.interventions.caa.CAASettings`); ``strength=`` sets any method's
            strength (HPR's and ITI's ``alpha``, CAA's ``multiplier``, ActAdd's ``coefficient``).

    Returns:
        A ``pyvene.IntervenableModel`` ready to generate, score and save (:func:`save`). Like
        every pyvene wrapper (and PEFT's ``get_peft_model``), it wraps ``model`` itself and leaves
        it in eval mode with ``requires_grad=False`` on every weight; actedit's own passes while
        fitting (collection) give the model back as they found it. To fine-tune the model itself
        afterwards, call ``model.requires_grad_(True)``. Frozen weights cost nothing at inference
        (see :func:`actedit.interventions.compat.contiguous_head_input`).
    """
    spec = method_spec(method)
    values = dict(settings)
    if layers is not None:
        values["layers"] = layers
    fit_settings, train_settings = method_settings(spec.name, values, train)
    named = isinstance(data, str)
    if isinstance(data, str) and not is_contrast_name(data) and not Path(data).expanduser().is_file():
        raise ValueError(
            f"unknown task {data!r}; give a task or dataset name ({', '.join(contrast_names())}), a "
            "JSONL file, or the examples themselves."
        )
    cfg = PipelineConfig(
        model=getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        method=spec.name,
        data=DataSettings(
            name=data if isinstance(data, str) else "examples",
            source=source,
            split_file=split_file,
            eval_ratio=eval_ratio,
            seed=seed,
            limit=limit,
        ),
        collect=CollectSettings(dir=None if store is None else str(store), format=dict(prompt_format or {})),
        settings=fit_settings,
        train=train_settings,
        out=None,
    )
    cfg = cfg.for_model(model)
    dataset = load_dataset(cfg) if named else prepare_dataset(cfg, examples_dataset(data, cfg.reads_prompt_pairs))
    activations = collect(cfg, model, tokenizer, dataset=dataset, progress=progress, quiet=not progress)
    config, _ = make_edit(cfg, model, tokenizer, store=activations, progress=progress)
    return intervenable(model, config)


def save(pvm: pv.IntervenableModel, directory: Union[str, Path], *, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Save an edit as an artifact directory (atomically) that stock ``pyvene.IntervenableModel.load`` reads."""
    return save_artifact(pvm, directory, metadata=metadata)


def load(path_or_repo: Union[str, Path], model, *, revision: Optional[str] = None) -> pv.IntervenableModel:
    """Load an artifact (directory or Hub repo id) onto ``model``, with clear errors for bad input."""
    return load_artifact(path_or_repo, model, revision=revision)


def compose(
    *edits: Union[pv.IntervenableModel, str, Path], model=None, metadata: Optional[Dict[str, Any]] = None
) -> pv.IntervenableModel:
    """One ``IntervenableModel`` with every edit of ``edits`` (intervenable models or artifact
    directories / Hub ids), in the registry's order where they share a site.

    ``model`` is the base model the artifacts load onto (default: that of the first intervenable
    model given).
    """
    if not edits:
        raise ValueError("compose() needs at least one edit.")
    base = model if model is not None else next((e.model for e in edits if is_intervenable(e)), None)
    if base is None:
        raise ValueError("compose() of artifact paths needs the base model: pass model=...")
    configs = [config_of(e if is_intervenable(e) else load_artifact(e, base)) for e in edits]
    return intervenable(base, compose_configs(*configs, metadata=metadata))


__all__ = ["compose", "examples_dataset", "fit", "load", "save"]
