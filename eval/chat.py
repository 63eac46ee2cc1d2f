"""An interactive session with an edited model whose edited layers can be re-selected live.

Like the HPR repository's ``cli_demo.py``: type a prompt and the edited model answers; a line

    ### target layers: 13,14,15     edit only these of the artifact's layers
    ### target layers: all          edit every layer of the artifact
    ### target layers: none         the base model, unedited

changes which layers are edited; ``### status`` shows them, ``### help`` lists the commands,
and an empty line (or end of input) ends the session. Input is read from stdin and answers are
written to stdout, so a session can be scripted by piping lines in.

How layers are switched: the artifact is loaded once with
:func:`actedit.interventions.load_artifact`; its interventions are kept keyed by layer (an
artifact composing several methods may hold several per layer, kept in the artifact's order).
Selecting layers builds a new ``pyvene.IntervenableConfig`` from those interventions and a new
``IntervenableModel`` on the same base model, after removing any pyvene hook left on it; ``none``
uses the base model directly. Generation follows :mod:`actedit.data.generate` (greedy by default,
chat template when the tokenizer has one, ``pvm.generate(..., unit_locations=None,
intervene_on_prompt=True)``).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO, Tuple, Union

import pyvene as pv

from actedit.data.generate import GenerationSettings, build_prompt, generate_texts, uses_chat_template
from actedit.interventions import compat
from actedit.interventions.artifacts import load_artifact
from actedit.interventions.edits import config_of, intervenable

PROMPT_LINE = "Enter your input prompt (Leave empty to end program):"

HELP = """Commands:
  ### target layers: 13,14,15   edit only these layers (ranges like 10-12 work too)
  ### target layers: all        edit every layer of the artifact
  ### target layers: none       no edit (the base model)
  ### status                    show the edited layers
  ### help                      show this help
  (empty line)                  end the session
Any other line is a prompt for the model."""

_TARGET = re.compile(r"^###\s*target[\s_-]*layers?\s*:?\s*(.*)$", re.IGNORECASE)
_COMMAND = re.compile(r"^###\s*(\w+)\s*$")


def parse_layer_selection(text: Union[str, Iterable[int], None], available: Sequence[int]) -> List[int]:
    """Layers selected by ``text``: ``"all"``, ``"none"`` (or empty), or indices like ``"13,14,15"`` / ``"10-12"``.

    Raises:
        ValueError: for a malformed list or layers the artifact does not edit.
    """
    available = sorted(int(x) for x in available)
    if text is None:
        return list(available)
    if not isinstance(text, str):
        chosen = [int(x) for x in text]
    else:
        spec = text.strip().lower()
        if spec == "all":
            return list(available)
        if spec in ("none", ""):
            return []
        chosen = []
        for part in re.split(r"[,\s]+", spec):
            if not part:
                continue
            match = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not match:
                raise ValueError(f"cannot read layer {part!r}: use e.g. '13,14,15', '10-12', 'all' or 'none'.")
            lo = int(match.group(1))
            hi = int(match.group(2)) if match.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"empty layer range {part!r}.")
            chosen += list(range(lo, hi + 1))
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(
            f"layer(s) {describe_layers(unknown)} are not edited by this artifact; "
            f"available: {describe_layers(available)}."
        )
    return sorted(set(chosen))


def describe_layers(layers: Sequence[int]) -> str:
    return ",".join(str(x) for x in layers)


class ChatSession:
    """A model, its tokenizer and an edit whose active layers can be changed.

    Args:
        model: the base model.
        tokenizer: its tokenizer.
        edits: layer → list of ``(RepresentationConfig, intervention)`` at that layer.
        info: the artifact's ``actedit`` metadata (kept in rebuilt configs).
        settings: :class:`~actedit.data.generate.GenerationSettings` (default: greedy, 100 new
            tokens, like the HPR demo).
        layers: initially active layers (a selection string or list; default: those the
            artifact switched on, which is all of them unless it kept every trained layer).
    """

    def __init__(
        self,
        model,
        tokenizer,
        edits: Mapping[int, Sequence[Tuple[Any, object]]],
        *,
        info: Optional[dict] = None,
        settings=None,
        layers: Union[str, Iterable[int], None] = None,
    ):
        if not edits:
            raise ValueError("the edit holds no interventions.")
        self.model = model
        self.tokenizer = tokenizer
        self.edits: Dict[int, List[Tuple[Any, object]]] = {int(k): list(v) for k, v in edits.items()}
        self.info = dict(info or {})
        self.settings = settings or GenerationSettings(max_new_tokens=100, batch_size=1)
        self.pvm = None
        self.active: List[int] = []
        self.select(layers)

    # ---------------------------------------------------------------------- construction
    @classmethod
    def from_pvm(cls, pvm, tokenizer, **kwargs) -> "ChatSession":
        """A session over the interventions of a ``pyvene.IntervenableModel`` (keyed by layer)."""
        edits: Dict[int, List[Tuple[object, object]]] = {}
        for rep in config_of(pvm).representations:
            edits.setdefault(int(rep.layer), []).append((rep, rep.intervention))
        info = getattr(pvm.config, "actedit", None) or {}
        return cls(pvm.model, tokenizer, edits, info=info, **kwargs)

    @classmethod
    def from_artifact(cls, path_or_repo, model, tokenizer, **kwargs) -> "ChatSession":
        """Load an artifact (directory or Hub repo id) onto ``model`` and open a session."""
        pvm = load_artifact(path_or_repo, model)
        return cls.from_pvm(pvm, tokenizer, **kwargs)

    # ------------------------------------------------------------------------- layers
    @property
    def available_layers(self) -> List[int]:
        return sorted(self.edits)

    @property
    def enabled_layers(self) -> List[int]:
        """The layers the artifact saved switched on (all of them, unless it kept every trained
        layer with ``keep_layers: all`` and switched on only the selected ones)."""
        return [
            layer
            for layer in self.available_layers
            if any(getattr(module, "is_enabled", True) for _, module in self.edits[layer])
        ]

    def select(self, layers: Union[str, Iterable[int], None]) -> List[int]:
        """Make ``layers`` the edited layers (see :func:`parse_layer_selection`; None: the layers
        the artifact switched on); returns them. Any layer the artifact holds can be chosen,
        including modules it saved switched off."""
        chosen = self.enabled_layers if layers is None else parse_layer_selection(layers, self.available_layers)
        self._rebuild(chosen)
        return chosen

    def _rebuild(self, layers: List[int]) -> None:
        self.pvm = None
        compat.apply()
        compat.remove_pyvene_hooks(self.model)  # no hook of an earlier wrapper may stay on the model
        self.active = list(layers)
        if not layers:
            return
        for layer in self.available_layers:  # the session owns its modules: switch exactly the chosen on
            for _, module in self.edits[layer]:
                switch = getattr(module, "set_enabled", None)
                if callable(switch):
                    switch(layer in layers)
        representations = [
            rep._replace(intervention=module)._asdict() for layer in layers for rep, module in self.edits[layer]
        ]
        config = pv.IntervenableConfig(representations=representations, actedit=self.info)
        self.pvm = intervenable(self.model, config)

    def describe(self) -> str:
        if not self.active:
            return "none (base model)"
        if self.active == self.available_layers:
            return f"all ({describe_layers(self.active)})"
        return describe_layers(self.active)

    # ---------------------------------------------------------------------- generation
    def respond(self, prompt: str) -> str:
        """The answer of the model with the active layers edited (base model when none)."""
        text = build_prompt(self.tokenizer, prompt, self.settings)
        chat = uses_chat_template(self.tokenizer, self.settings)
        target = self.pvm if self.pvm is not None else self.model
        return generate_texts(target, self.tokenizer, [text], self.settings, add_special_tokens=not chat)[0]

    def handle(self, line: str) -> Optional[str]:
        """The reply to one input line; ``None`` ends the session (empty line)."""
        text = line.rstrip("\r\n")
        if not text.strip():
            return None
        stripped = text.strip()
        target = _TARGET.match(stripped)
        if target:
            if not target.group(1).strip():
                return f"Targeting layers: {self.describe()} (available: {describe_layers(self.available_layers)})"
            try:
                self.select(target.group(1))
            except ValueError as exc:
                return f"Error: {exc} Still targeting layers: {self.describe()}"
            return f"Targeting layers: {self.describe()}"
        command = _COMMAND.match(stripped)
        if command:
            name = command.group(1).lower()
            if name == "help":
                return HELP
            if name == "status":
                return f"Targeting layers: {self.describe()} (available: {describe_layers(self.available_layers)})"
            return f"Unknown command {stripped!r}.\n{HELP}"
        if stripped.startswith("###"):
            return f"Unknown command {stripped!r}.\n{HELP}"
        return self.respond(text)

    def run(self, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
        """Read lines from ``stdin`` until an empty line or end of input, write replies to ``stdout``."""
        stdin = stdin or sys.stdin
        stdout = stdout or sys.stdout
        echo = not (hasattr(stdin, "isatty") and stdin.isatty())
        while True:
            stdout.write(PROMPT_LINE + "\n>>> ")
            stdout.flush()
            line = stdin.readline()
            if echo:
                stdout.write(line if line.endswith("\n") or not line else line + "\n")
            reply = self.handle(line) if line else None
            if reply is None:
                if not line:
                    stdout.write("\n")
                stdout.write("<CLOSED>\n")
                stdout.flush()
                return 0
            stdout.write(reply + "\n")
            stdout.flush()


__all__ = ["ChatSession", "HELP", "describe_layers", "parse_layer_selection"]
