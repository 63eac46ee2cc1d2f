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
from typing import List, Optional, Sequence

import torch

from actedit.data.models import load_model
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
    data.write_text("\n".join(json.dumps(r) for r in rows))
    source = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    mc1 = (source / "truthfulqa_mc1.yaml").read_text()
    hub_lines = ("dataset_path: truthfulqa/truthful_qa\n", "dataset_name: multiple_choice\n")
    if not all(line in mc1 for line in hub_lines):
        raise RuntimeError(
            f"lm-eval's {source / 'truthfulqa_mc1.yaml'} has an unexpected layout; "
            "this lm-eval version is not supported by local_truthfulqa_tasks."
        )
    mc1 = mc1.replace(hub_lines[0], f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n")
    mc1 = mc1.replace(hub_lines[1], "").replace("tag:\n  - truthfulqa\n", "")
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


def main(argv=None) -> None:
    """lm-eval's command line with the ``actedit`` model registered."""
    from lm_eval.__main__ import cli_evaluate  # lazy: importing lm-eval's CLI module parses its task registry

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
