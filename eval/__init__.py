"""actedit.eval: model loading and multiple-choice scoring (lm-eval's TruthfulQA MC1/MC2 protocol).

* :func:`load_model` — a causal LM and its tokenizer from an alias, a ``.gguf`` file, a local
  directory or a Hub id (:mod:`actedit.eval.models`);
* :func:`score_mc` — TruthfulQA MC1/MC2 of a model or a ``pyvene.IntervenableModel``, equal to
  lm-eval's ``truthfulqa_mc1``/``truthfulqa_mc2`` and computed from a cached primer
  (:mod:`actedit.eval.mc`); :func:`loglikelihoods` is the engine for other context/continuation
  tasks.
"""

from .mc import (
    MCRecord,
    MCResult,
    TRUTHFULQA_PRIMER,
    encode_pair,
    loglikelihoods,
    mc1_correct,
    mc2_value,
    mean_stderr,
    needs_full_sequences,
    score_mc,
    truthfulqa_context,
)
from .models import ALIASES, ModelPackageMissing, ModelSpecError, load_model, resolve_spec

__all__ = [
    "ALIASES", "MCRecord", "MCResult", "ModelPackageMissing", "ModelSpecError", "TRUTHFULQA_PRIMER", "encode_pair",
    "load_model", "loglikelihoods", "mc1_correct", "mc2_value", "mean_stderr", "needs_full_sequences",
    "resolve_spec", "score_mc", "truthfulqa_context",
]
