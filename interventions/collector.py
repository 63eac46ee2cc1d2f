"""The one intervention that reads activations instead of editing them.

Activation collection (:mod:`actedit.data.collect`) and the analyses (:mod:`actedit.eval.analysis`)
both read activations through pyvene, never through ``output_hidden_states`` (pyvene removes the
hooks that implement it under transformers 5; see :mod:`actedit.interventions.compat`).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import pyvene as pv
import torch


class ActivationCollector(pv.SourcelessIntervention, pv.TrainableIntervention):  # type: ignore[misc]  # pyvene is untyped
    """Records its input and returns it unchanged.

    With ``unit_locations=None`` pyvene hands it the whole activation ``(batch, seq, d)`` of each
    forward call; ``keep_last_dim=True`` keeps that shape (pyvene's own ``CollectIntervention``
    flattens several positions to ``(batch, seq·d)`` and returns only the first ``d`` columns).
    It has no ``method_name``, so :func:`actedit.interventions.compose` places it after every
    actedit edit at the same site: it sees the edited activation.

    Two ways to record, per forward call, appended to :attr:`records`:

    * :attr:`rows`/:attr:`cols` set (LongTensors of equal length): ``base[rows, cols]``, the
      positions collection reads; ``rows=None`` with ``cols`` unset records nothing;
    * otherwise (:attr:`record_all`): the whole activation, through ``reduce`` when given (e.g.
      a norm over the last dimension, to keep memory small).

    Args:
        embed_dim: width of the site (informative).
        reduce: applied to each whole detached activation before it is stored.
        record_all: record whole activations (True) or only the selected positions (False).
    """

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        record_all: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("keep_last_dim", None)
        super().__init__(embed_dim=embed_dim, **kwargs, keep_last_dim=True)
        self.reduce = reduce
        self.record_all = record_all
        self.rows: Optional[torch.Tensor] = None
        self.cols: Optional[torch.Tensor] = None
        self.records: List[torch.Tensor] = []

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.rows is not None:
            self.records.append(base[self.rows, self.cols].detach())
        elif self.record_all:
            value = base.detach()
            self.records.append(self.reduce(value) if self.reduce is not None else value.clone())
        return base

    def select(self, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> None:
        """Record ``base[rows, cols]`` on the next calls (None: nothing), dropping earlier records."""
        self.rows, self.cols = rows, cols
        self.records = []

    def clear(self) -> None:
        self.records = []

    def __str__(self) -> str:
        return "ActivationCollector()"
