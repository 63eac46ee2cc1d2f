"""The base class every actedit intervention derives from.

It encodes the pyvene facts that make an edit save and load with the stock
``pyvene.IntervenableModel.save/load``:

* it is ``SourcelessIntervention`` (applied without sources) **and** ``TrainableIntervention``
  (``save()`` writes a ``.bin`` only for trainable interventions; a non-trainable class with
  fitted buffers would reload re-initialised, silently);
* every constructor kwarg has a default, and every hyperparameter lives in a parameter or
  buffer, because ``load()`` rebuilds the class as ``cls(**representation_fields,
  embed_dim=..., use_fast=False)`` and then calls ``load_state_dict``;
* buffers whose shape depends on the fit (SEA's ranks, ITI's head count, ActAdd's prompt
  length, HPR's widths) are resized from the incoming state dict before it is loaded;
* ``state_dict()`` returns CPU tensors, so an artifact saved from a GPU loads on a CPU-only
  machine (pyvene's ``load`` calls ``torch.load`` without ``map_location``);
* the output is cast back to the input dtype (pyvene's bf16 scatter needs it), and handed back on
  the input's device (an activation arriving from another device of a ``device_map`` model is
  edited where the module's tensors are: :mod:`actedit.interventions.devices`);
* a module can be saved switched off (buffer ``enabled``; a trained method's ``keep_layers: all``
  keeps every layer's module and enables the selected ones): it then returns its input unchanged,
  and artifacts saved before the switch existed load switched on;
* ``generate`` holds every edit :meth:`~ActEditIntervention.frozen` for the call: settings read
  once, and a method's :meth:`~ActEditIntervention.frozen_edit` (its fast path, equal to
  :meth:`~ActEditIntervention.edit` to float rounding) instead of the edit at every layer and token.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pyvene as pv
import torch

from .positions import PolicyLike, PositionPolicy, edit_positions

ACTEDIT_ARTIFACT_VERSION = 1

EffectRecorder = Callable[["ActEditIntervention", torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``recorder(intervention, h, edited, mask)``: activations before and after an edit
``(batch, seq, d)`` and the positions its policy selected ``(batch, seq)``."""


class ActEditIntervention(pv.SourcelessIntervention, pv.TrainableIntervention):  # type: ignore[misc]  # pyvene is untyped
    """Base of all actedit interventions: position policy, dtype handling, resizable buffers.

    Subclasses implement :meth:`edit`, which maps activations ``(batch, seq, d)`` to edited
    activations of the same shape; the base applies it only where the position policy says so.

    Args:
        embed_dim: width ``d`` of the hooked activation (pyvene passes it).
        position_policy: a :class:`~actedit.interventions.positions.PositionPolicy`, its name or
            id; defaults to the class's :attr:`default_policy`.
        position_start: the ``start`` of :attr:`PositionPolicy.FROM_POSITION`.
    """

    default_policy: PositionPolicy = PositionPolicy.ALL
    method_name: str = "base"
    fixed_parameters: Tuple[str, ...] = ()
    """Parameters set from the training activations by :meth:`prepare` before training and never
    trained (HPR's ``input_scale``): trainers keep them frozen and stack them with the rest."""

    # buffers (registered in __init__; ``embed_dim`` by pyvene, None when not given)
    embed_dim: Optional[torch.Tensor]
    position_policy: torch.Tensor
    position_start: torch.Tensor
    artifact_version: torch.Tensor
    enabled: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        position_policy: Optional[PolicyLike] = None,
        position_start: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("keep_last_dim", None)
        super().__init__(embed_dim=embed_dim, **kwargs, keep_last_dim=True)
        policy = PositionPolicy.parse(self.default_policy if position_policy is None else position_policy)
        self.register_buffer("position_policy", torch.tensor(int(policy), dtype=torch.long))
        self.register_buffer("position_start", torch.tensor(int(position_start), dtype=torch.long))
        self.register_buffer("artifact_version", torch.tensor(ACTEDIT_ARTIFACT_VERSION, dtype=torch.long))
        self.register_buffer("enabled", torch.tensor(True))
        self.effect_recorder: Optional[EffectRecorder] = None
        """Called as ``recorder(self, h, edited, mask)`` after every forward that edits a position
        (``actedit.eval.effect`` measures an edit's effect with it); not saved."""

    # ----------------------------------------------------------------------------- properties
    def host(self, name: str) -> Any:
        """The Python value of the 0-d buffer ``name`` (a setting saved with the artifact).

        Read from the buffer's device once and kept while the buffer is the same tensor at the same
        version (an in-place write such as ``fill_`` or ``load_state_dict`` bumps the version; a
        move makes a new tensor): on a GPU every ``int(buffer)`` waits for all queued work, and the
        forward pass reads several settings at every edited layer and token."""
        tensor: torch.Tensor = getattr(self, name)
        if tensor.is_inference():  # built under torch.inference_mode: no version to key on
            return tensor.item()
        return self._kept(f"setting {name}", (tensor,), tensor.item)

    def holds_setting(self, name: str) -> bool:
        """Whether the numeric setting ``name`` lives in a 0-d floating-point buffer of this module
        (a strength: ITI's and HPR's ``alpha``, CAA's ``multiplier``), which
        :meth:`set_inference_setting` can change after the fit."""
        buffer = self._buffers.get(name)
        return buffer is not None and buffer.dim() == 0 and buffer.is_floating_point()

    def set_inference_setting(self, name: str, value: float) -> None:
        """Set the numeric setting ``name`` of a fitted module in place (see :meth:`holds_setting`):
        the module then edits as one fitted with that value (a sweep over strengths fits once)."""
        if not self.holds_setting(name):
            raise ValueError(
                f"{type(self).__name__} keeps no numeric setting {name!r} in a buffer: fit again to change it."
            )
        with torch.no_grad():
            self._buffers[name].fill_(float(value))
        self._forget_kept()

    def _forget_kept(self) -> None:
        """Drop the values :meth:`host` and :meth:`derived` keep: a setter changed a buffer, and a
        deep copy's buffers restart their version counters, so a kept key could match again."""
        self.__dict__.pop("_kept_values", None)

    def __getstate__(self) -> Dict[str, Any]:
        """The module's state for ``copy.deepcopy`` and pickle, without the kept values (their keys
        name tensor versions, which a copy does not keep)."""
        state = dict(self.__dict__)
        state.pop("_kept_values", None)
        state.pop("_frozen_plan", None)
        return state

    def derived(self, name: str, inputs: Tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, a value made from this module's tensors ``inputs`` only (ITI's shift δ,
        HPR's hyperplane normal), kept while each input is the same tensor at the same version.

        The cached value is the one ``compute()`` gives, so results are bit-identical; it spares
        the small kernels that rebuild it at every edited layer and generated token. Computed
        afresh whenever autograd records (training needs the graph), an input is an inference
        tensor (no version to key on) or an input requires grad: an optimizer may change it in
        place without a new version (torch 2.13's ``AdamW(fused=True)`` does). ``name`` must also
        say anything else ``compute`` reads (a dtype, a device)."""
        if torch.is_grad_enabled() or any(t.is_inference() or t.requires_grad for t in inputs):
            return compute()
        return self._kept(f"derived {name}", inputs, compute)

    def _kept(self, slot: str, inputs: Tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        """``compute()``, kept in ``slot`` while each of ``inputs`` is the same tensor at the same
        version (the cache holds the tensors, so their ids stay unique)."""
        key = tuple((t, t._version) for t in inputs)
        cache: Dict[str, Tuple[Tuple[Tuple[torch.Tensor, int], ...], Any]] = self.__dict__.setdefault(
            "_kept_values", {}
        )
        hit = cache.get(slot)
        if (
            hit is None
            or len(hit[0]) != len(key)
            or any(a is not b or u != v for (a, u), (b, v) in zip(hit[0], key, strict=True))
        ):
            hit = cache[slot] = (key, compute())
        return hit[1]

    @property
    def d(self) -> int:
        """The activation width this intervention was built for."""
        if self.embed_dim is None:
            raise ValueError(
                f"{type(self).__name__} needs embed_dim (the hidden size of the hooked site); "
                "pyvene passes it when it builds the intervention from a config."
            )
        return int(self.host("embed_dim"))

    @property
    def policy(self) -> PositionPolicy:
        return PositionPolicy(int(self.host("position_policy")))

    def set_position_policy(self, policy: PolicyLike, start: Optional[int] = None) -> "ActEditIntervention":
        """Change which positions are edited (in place); returns ``self``."""
        self.position_policy.fill_(int(PositionPolicy.parse(policy)))
        if start is not None:
            self.position_start.fill_(int(start))
        self._forget_kept()
        return self

    @property
    def is_enabled(self) -> bool:
        """Whether the module edits (a switched-off one returns its input unchanged)."""
        return bool(self.host("enabled"))

    def set_enabled(self, enabled: bool = True) -> "ActEditIntervention":
        """Switch the edit on or off (in place; saved with the artifact); returns ``self``."""
        self.enabled.fill_(bool(enabled))
        self._forget_kept()
        return self

    def full_sequence_reason(self) -> Optional[str]:
        """Why a scorer must run each scored sequence whole, or None.

        None when the edit of a token depends only on that token and its position in its own
        sequence: a scorer may then cache a shared context, or pack several sequences in one row
        (:mod:`actedit.interventions.packing`), and get the scores of one plain forward per
        sequence. ``from_position`` with a start below -1 edits context tokens by their distance
        to the end of each scored sequence, which a context shared by several continuations cannot
        give; subclasses whose edit pools tokens (SEA's ``feature`` norm) add their reason.
        """
        if self.policy == PositionPolicy.FROM_POSITION and int(self.position_start) < -1:
            return f"{type(self).__name__} uses from_position with start {int(self.position_start)} < -1"
        return None

    def extra_repr(self) -> str:
        return f"d={self.embed_dim.item() if self.embed_dim is not None else None}, policy={self.policy.name.lower()}"

    def __str__(self) -> str:  # pyvene prints interventions with str()
        return f"{type(self).__name__}({self.extra_repr()})"

    def prepare(self, h: torch.Tensor) -> None:
        """Set :attr:`fixed_parameters` from training activations ``h`` ``(n, d)``, before training.
        The base class has none and does nothing."""

    def gate(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """Which positions of ``h`` ``(batch, seq, d)`` the edit acts on among those its position
        policy selects (bool ``(batch, seq)``), or None for all of them. HPR acts only where its
        probe says negative; an effect measurement reports the fraction."""
        return None

    # ------------------------------------------------------------------------------- forward
    def edit(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Edited activations for ``h`` of shape ``(batch, seq, d)``.

        ``mask`` (``(batch, seq)`` bool) marks the positions that will be kept from the result;
        most methods ignore it, statistics over tokens (SEA's per-feature norm) use it.
        """
        raise NotImplementedError

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        plan: Optional[EditPlan] = self.__dict__.get("_frozen_plan")
        return (plan or self.plan(self.edit))(base)

    def plan(self, edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "EditPlan":
        """An :class:`EditPlan` of ``edit`` with this module's settings as they are now."""
        return EditPlan(
            self,
            width=self.d,
            enabled=self.is_enabled,
            policy=self.policy,
            start=int(self.host("position_start")),
            home=self.enabled.device,
            edit=edit,
        )

    def frozen_edit(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`edit` with every setting and every tensor derived from the module's own read
        once, for as long as they do not change (:meth:`frozen`). The base returns :meth:`edit`;
        methods whose edit rebuilds tensors or reads settings at each call return a closure
        (the fast path; :meth:`edit` is its reference, and tests compare the two)."""
        return self.edit

    @contextlib.contextmanager
    def frozen(self) -> Iterator["ActEditIntervention"]:
        """Within the block, :meth:`forward` runs the :meth:`frozen_edit` with the settings read
        once on entry: the module's tensors must not change inside it (``generate`` holds it
        for one call; a decode step then pays no setting reads, dictionary lookups or rebuilt
        tensors at each edited layer and token)."""
        previous = self.__dict__.get("_frozen_plan")
        with torch.no_grad():
            self.__dict__["_frozen_plan"] = self.plan(self.frozen_edit())
        try:
            yield self
        finally:
            if previous is None:
                self.__dict__.pop("_frozen_plan", None)
            else:
                self.__dict__["_frozen_plan"] = previous

    # --------------------------------------------------------------------------- save / load
    def resizable_buffers(self) -> Tuple[str, ...]:
        """Names of buffers whose shape is set by the fit and read from a loaded state dict."""
        return ()

    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Hook for subclasses: rebuild submodules whose shape a state dict decides."""

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        saved_dim = state_dict.get(prefix + "embed_dim")
        if saved_dim is not None and self.embed_dim is not None and int(saved_dim) != int(self.embed_dim):
            raise ValueError(
                f"{type(self).__name__}: the saved edit was fitted on activations of width "
                f"{int(saved_dim)}, but this model's site has width {int(self.embed_dim)}. Load the "
                "artifact into the model family and size it was made for."
            )
        version = state_dict.get(prefix + "artifact_version")
        if version is not None and int(version) > ACTEDIT_ARTIFACT_VERSION:
            raise ValueError(
                f"This artifact uses actedit format {int(version)}, newer than the installed "
                f"actedit understands ({ACTEDIT_ARTIFACT_VERSION}); upgrade actedit."
            )
        if isinstance(state_dict, dict):  # saved before the on/off switch existed: on
            state_dict.setdefault(prefix + "enabled", torch.tensor(True))
        self._prepare_load(state_dict, prefix)
        for name in self.resizable_buffers():
            incoming = state_dict.get(prefix + name)
            if incoming is not None:
                current = getattr(self, name)
                self._buffers[name] = torch.empty(incoming.shape, dtype=incoming.dtype, device=current.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Dict[str, Any]:
        result: Dict[str, Any] = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None and not keep_vars:
            # CPU copies: pyvene's load() calls torch.load without map_location.
            for key, value in list(result.items()):
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    result[key] = value.detach().cpu()
        return result


class EditPlan:
    """How a module applies an edit at one call: the settings :meth:`ActEditIntervention.forward`
    reads (width, on/off switch, position policy and start, the device of its tensors) and the
    edit ``(h, mask) -> h′``. Built at every call from the buffers, or once for a block by
    :meth:`ActEditIntervention.frozen`; both run this same code."""

    __slots__ = ("module", "width", "enabled", "policy", "start", "home", "edit")

    def __init__(
        self,
        module: ActEditIntervention,
        *,
        width: int,
        enabled: bool,
        policy: PositionPolicy,
        start: int,
        home: torch.device,
        edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.module, self.width, self.enabled, self.policy = module, width, enabled, policy
        self.start, self.home, self.edit = start, home, edit

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        if base.device != self.home:
            # A model spread over devices (``device_map``): the activation comes from the device
            # its producer ran on (a pre-hook sees it before accelerate moves it), the module lives
            # on its hooked module's execution device (:func:`~actedit.interventions.devices.place_interventions`).
            # Computed here, handed back where pyvene scatters it.
            return self._edited(base.to(self.home)).to(base.device)
        return self._edited(base)

    def _edited(self, base: torch.Tensor) -> torch.Tensor:
        squeeze = base.dim() == 2
        h = base.unsqueeze(1) if squeeze else base
        if h.shape[-1] != self.width:
            raise ValueError(
                f"{type(self.module).__name__} was built for activations of width {self.width} but "
                f"received width {h.shape[-1]}: the artifact does not match this model or site."
            )
        if not self.enabled:
            return base
        batch, seq = h.shape[0], h.shape[1]
        mask, any_edited, all_edited = edit_positions(self.policy, self.start, batch, seq, h.device)
        recorder = self.module.effect_recorder
        if not any_edited:
            if recorder is not None:
                recorder(self.module, h, h, mask)
            return base
        edited = self.edit(h, mask).to(h.dtype)
        out = edited if all_edited else torch.where(mask[..., None], edited, h)
        if recorder is not None:
            recorder(self.module, h, out, mask)
        out = out.squeeze(1) if squeeze else out
        return out.to(base.dtype)


def shift_edit(shift: torch.Tensor) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
    """The edit h ↦ h + ``shift``, the shift cast once per activation dtype (the frozen edit of
    the additive methods)."""
    casts: Dict[torch.dtype, torch.Tensor] = {}

    def edit(h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        cast = casts.get(h.dtype)
        if cast is None:
            cast = casts[h.dtype] = shift.to(h.dtype)
        return h + cast

    return edit
