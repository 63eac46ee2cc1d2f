"""actedit.eval: multiple-choice scoring of any registered task (lm-eval's protocol), analyses of an
edit, the lm-eval bridge, generations before and after an edit, and ``actedit eval`` / ``actedit chat``.

* :func:`score_mc` / :func:`score_mc_many` — a task's metrics (TruthfulQA MC1/MC2 by default) of a
  model or a ``pyvene.IntervenableModel``, equal to lm-eval's and computed from a cached primer
  (:mod:`actedit.eval.mc`); :func:`loglikelihoods` is the engine for any context/continuation pairs;
* :mod:`actedit.eval.analysis` — norms, flips, side effects, layer curves.
"""

from .mc import MCRecord, MCResult, encode_pair, loglikelihoods, needs_full_sequences, score_mc, score_mc_many

__all__ = ["MCRecord", "MCResult", "encode_pair", "loglikelihoods", "needs_full_sequences", "score_mc", "score_mc_many"]
