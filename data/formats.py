"""Prompt formats: how each method turns an example into token ids and reading positions.

A format is a small frozen dataclass; its fields are its parameters and are recorded in every
activation store it produced. :meth:`PromptFormat.encode` reads one example (and the tokenizer)
and returns an :class:`EncodedExample`: one :class:`EncodedSequence` per response, each with the
full token ids (special tokens included, exactly what the model sees) and the positions at which
activations are read. The collector (:mod:`actedit.data.collect`) shares the longest common
prefix of the sequences of one example automatically, so a format never has to split prompt and
response itself.

======================  =====================================================  ====================
format                  text                                                   positions read
======================  =====================================================  ====================
:class:`HPRFormat`      chat template; user: ``Question: {q}\\nChoices:\\nA. …``  every response token
                        ``\\nAnswer:\\n``; assistant: ``X. {choice}``             (aligned in pairs up
                                                                               to the shorter one)
:class:`ITIFormat`      ``Q: {q} A: {a}``                                      last token
:class:`CAAFormat`      chat template; user: the A/B question; assistant:      the answer letter
                        ``(A)``
:class:`SEAFormat`      ``{preamble}Q: {q}\\nA:`` + ``" " + completion``          last token
:class:`ActAddFormat`   each steering prompt (BOS included), the shorter       every position
                        right-padded with a space token
======================  =====================================================  ====================

Sources: HPR — VinAIResearch/HPR ``activation_editing/utils/task.py`` (lettered, shuffled MC
choices) and ``get_activations.py`` (chat template without system prompt; the response mask starts
after the tokens of the question rendered with ``add_generation_prompt=True``; positions compared
pairwise up to the shorter sequence). ITI — likenneth/honest_llama (``"Q: {question} A:
{choice}"``, last token). CAA — Rimsky et al. (A/B answer, activation at the letter). SEA —
yfqiu-nlp/sea-llm (``"Q: " + question + "\\nA:"`` then ``" " + answer``, last token). ActAdd —
Turner et al. (per-position activations, shorter prompt padded with spaces).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

from .contrast import ContrastDataset, ContrastExample, PromptPair, PromptPairDataset, first_responses, to_ab_questions

LETTERS = string.ascii_uppercase


@dataclass
class EncodedSequence:
    """One tokenized sequence of an example and where to read it.

    Attributes:
        ids: every token id the model sees (special tokens included).
        read_positions: 0-based positions into ``ids`` whose activations are stored, ascending.
        role: ``"pos"``, ``"neg"`` or ``"base"`` (ActAdd: prompt1 is ``pos``, prompt2 ``neg``).
        response: index of the response among the example's responses of that role.
        text: the rendered text (for inspection; not stored).
    """

    ids: List[int]
    read_positions: List[int]
    role: str
    response: int
    text: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError(f"{self.role} sequence {self.response} tokenized to no tokens.")
        if not self.read_positions:
            raise ValueError(f"{self.role} sequence {self.response} has no position to read.")
        prev = -1
        for p in self.read_positions:
            if not 0 <= p < len(self.ids) or p <= prev:
                raise ValueError(
                    f"{self.role} sequence {self.response}: read positions must be ascending "
                    f"indices into its {len(self.ids)} tokens, got {self.read_positions}."
                )
            prev = p


@dataclass
class EncodedExample:
    """The sequences of one example, in role order (positives, negatives, bases)."""

    sequences: List[EncodedSequence]

    @property
    def num_rows(self) -> int:
        """Activation rows (per site and layer) this example produces."""
        return sum(len(s.read_positions) for s in self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.ids) for s in self.sequences)


# ----------------------------------------------------------------------------- tokenization
def encode_text(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    """Token ids of ``text`` (``add_special_tokens`` as the tokenizer defines it, e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer can render conversations (chat/instruct models; base models cannot)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` rendered by the tokenizer's chat template, as text."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) has no chat "
            "template (a base model?); set the format's chat=false (or leave chat unset: the plain-text form is "
            "then chosen automatically), or use a chat/instruct model's tokenizer."
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some versions return a list for a single conversation
        text = text[0]
    return text


def token_at_char(tokenizer, text: str, char_index: int, add_special_tokens: bool, ids: Sequence[int]) -> int:
    """Index in ``ids`` (the tokenization of ``text``) of the token that holds ``text[char_index]``.

    Uses the fast tokenizer's offset mapping; for slow tokenizers, the last token of the
    tokenization of ``text[:char_index + 1]`` (which must be a prefix of ``ids``).
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets is not None and list(enc["input_ids"]) == list(ids):
        for i, (start, end) in enumerate(offsets):
            if start <= char_index < end:
                return i
    head = encode_text(tokenizer, text[: char_index + 1], add_special_tokens)
    if list(ids[: len(head)]) == head:
        return len(head) - 1
    raise ValueError(f"cannot locate character {char_index} ({text[char_index]!r}) of {text[-80:]!r} among its tokens.")


def _messages(system_prompt: Optional[str], user: str, assistant: Optional[str] = None) -> List[Dict[str, str]]:
    out = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


def tokenizer_fingerprint(tokenizer) -> Dict[str, Any]:
    """What identifies a tokenizer's behaviour in an activation store's manifest."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = repr(sorted(template.items()))
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": len(tokenizer),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }


# ----------------------------------------------------------------------------------- formats
def _check_template(owner: str, template: str, *fields: str) -> None:
    missing = [f for f in fields if "{" + f + "}" not in template]
    if missing:
        raise ValueError(
            f"{owner} template {template!r} lacks the placeholder(s) " + ", ".join("{" + f + "}" for f in missing) + "."
        )


@dataclass(frozen=True)
class PromptFormat:
    """Base of all formats. Subclasses set :attr:`name`, :attr:`accepts` and :meth:`encode`."""

    name = "base"
    accepts: type = field(default=ContrastExample, init=False, repr=False, compare=False)

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        """Token ids and reading positions of every sequence of ``example``.

        ``index`` is the example's position in its dataset (used when it has no ``id``).
        """
        raise NotImplementedError

    def params(self) -> Dict[str, Any]:
        """The format's name and parameters (recorded in stores; part of the resume check)."""
        values = {k: v for k, v in asdict(self).items() if k != "accepts"}
        return {"name": self.name, **values}

    def check(self, example) -> None:
        if not isinstance(example, self.accepts):
            raise ValueError(
                f"{type(self).__name__} reads {self.accepts.__name__} items, got {type(example).__name__}."
            )

    def prepare(self, dataset, seed: int = 0):
        """The dataset in the shape this format reads (the default: as it is). Formats convert
        what they can (CAA: free-text answers to A/B questions) and refuse what they cannot read,
        with an error naming what they need."""
        if not isinstance(dataset, ContrastDataset):
            raise ValueError(
                f"the {self.name} format reads contrast examples (prompt, positives, negatives), got "
                f"{type(dataset).__name__}."
            )
        return dataset

    def needs_bases(self, dataset) -> bool:
        """Whether the dataset lacks the base completions this format reads (SEA)."""
        return False

    def for_tokenizer(self, tokenizer) -> Tuple["PromptFormat", Optional[str]]:
        """This format as it will run with ``tokenizer``, and a note when it had to adapt.

        Formats with a ``chat`` field render through the chat template when it is True, in their
        plain-text form when False, and choose when it is None (unset): the template when the
        tokenizer has one, else the plain-text form, with a note saying so. ``chat=True`` with a
        tokenizer without template is an error that names the fix.
        """
        chat = getattr(self, "chat", False)
        template = has_chat_template(tokenizer)
        if chat is None:
            resolved = replace(cast(Any, self), chat=template)  # only formats with a chat field get here
            note = (
                None
                if template
                else (
                    f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no chat "
                    f"template (a base model); the {self.name} prompts use their plain-text form instead"
                )
            )
            return resolved, note
        if chat and not template:
            raise ValueError(
                f"the {self.name} format has chat=true but the tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no chat "
                "template (a base model); set collect.format.chat=false or leave it unset to use the "
                "plain-text form."
            )
        return self, None


@dataclass(frozen=True)
class HPRFormat(PromptFormat):
    """HPR's training format: every response token of a chat-formatted answer.

    With ``lettered=True`` (TruthfulQA MC), the choices (positives then negatives, i.e. the MC2
    release order) are shuffled with a per-example seeded RNG and lettered; the user message is
    ``"Question: {q}\\nChoices:\\nA. {c1}\\nB. {c2}\\n...\\nAnswer:\\n"`` and each response is
    ``"X. {choice}"``. With ``lettered=False`` (ToxiGen, BIG-bench) the prompt is the user
    message and the responses are used as they are.

    Tokens (``chat=True``, the official setting): the conversation (user, assistant) rendered by
    the chat template and tokenized without adding special tokens; the response starts after as
    many tokens as the question rendered with ``add_generation_prompt=True`` has. Every token from
    there on is read, including the template's end-of-turn tokens (``<|im_end|>`` and a newline
    for ChatML), as in the official ``get_activations.py``; ``include_end_tokens=False`` stops at
    the last token of the response text. Plain text (``chat=False``, for base models without a
    template): the user message tokenized with special tokens (BOS), followed by the response's
    own tokens, all of which are read. Pairs are aligned per position up to the shorter response when the store
    is read. (TruthfulQA train split, HPR's file, SmolLM2's tokenizer: 4,911 pairs; 59,674
    aligned token pairs with end tokens, 49,852 without.)

    Attributes:
        lettered: letter and shuffle the choices (TruthfulQA MC) or not.
        shuffle: shuffle the choices before lettering (HPR does, to avoid "true answers first").
        seed: seed of the per-example shuffle; each example's order depends only on the seed and
            the example's ``id`` (its dataset index when it has none).
        system_prompt: a system message (HPR uses none; templates may add their default).
        include_end_tokens: also read the template's tokens after the response text (official).
        chat: render through the chat template (True), as plain text (False), or unset (None):
            the template when the tokenizer has one (see :meth:`PromptFormat.for_tokenizer`).
    """

    lettered: bool = True
    shuffle: bool = True
    seed: int = 0
    system_prompt: Optional[str] = None
    include_end_tokens: bool = True
    chat: Optional[bool] = None
    name = "hpr"

    def choices(self, example: ContrastExample, index: int = 0) -> Tuple[str, List[str], List[str]]:
        """``(user message, positive responses, negative responses)`` as HPR renders them."""
        if not self.lettered:
            return example.prompt, list(example.positives), list(example.negatives)
        raw = list(example.positives) + list(example.negatives)
        labels = [1] * len(example.positives) + [0] * len(example.negatives)
        if len(raw) > len(LETTERS):
            raise ValueError(f"example {example.id or index} has {len(raw)} choices; lettering supports at most 26.")
        order = list(range(len(raw)))
        if self.shuffle:
            key = example.id if example.id is not None else index
            random.Random(f"hpr:{self.seed}:{key}").shuffle(order)
        lettered = [f"{LETTERS[i]}. {raw[j]}" for i, j in enumerate(order)]
        user = f"Question: {example.prompt}\nChoices:\n" + "\n".join(lettered) + "\nAnswer:\n"
        pos = [lettered[i] for i, j in enumerate(order) if labels[j] == 1]
        neg = [lettered[i] for i, j in enumerate(order) if labels[j] == 0]
        return user, pos, neg

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        self.check(example)
        user, pos, neg = self.choices(example, index)
        if self.chat is None:  # unset: as for_tokenizer() resolves it
            return replace(self, chat=has_chat_template(tokenizer)).encode(example, tokenizer, index)
        if not self.chat:
            prompt = encode_text(tokenizer, user, add_special_tokens=True)
            sequences = []
            for role, responses in (("pos", pos), ("neg", neg)):
                for r, response in enumerate(responses):
                    answer = encode_text(tokenizer, response, add_special_tokens=False)
                    if not answer:
                        raise ValueError(
                            f"example {example.id or index}: the {role} response {response!r:.60} "
                            "tokenizes to no token."
                        )
                    ids = prompt + answer
                    sequences.append(EncodedSequence(ids, list(range(len(prompt), len(ids))), role, r, user + response))
            return EncodedExample(sequences)
        question = chat_text(tokenizer, _messages(self.system_prompt, user), add_generation_prompt=True)
        start = len(encode_text(tokenizer, question, add_special_tokens=False))
        sequences = []
        for role, responses in (("pos", pos), ("neg", neg)):
            for r, response in enumerate(responses):
                text = chat_text(tokenizer, _messages(self.system_prompt, user, response), add_generation_prompt=False)
                ids = encode_text(tokenizer, text, add_special_tokens=False)
                end = len(ids)
                if not self.include_end_tokens:
                    last_char = text.rfind(response) + len(response) - 1
                    if last_char < 0:
                        raise ValueError(
                            f"example {example.id or index}: the chat template altered the response "
                            f"{response!r:.60}; use include_end_tokens=True."
                        )
                    end = token_at_char(tokenizer, text, last_char, False, ids) + 1
                if end <= start:
                    raise ValueError(
                        f"example {example.id or index}: the {role} response {response!r:.60} adds no "
                        "token after the question prompt (check the chat template)."
                    )
                sequences.append(EncodedSequence(ids, list(range(start, end)), role, r, text))
        return EncodedExample(sequences)


@dataclass(frozen=True)
class ITIFormat(PromptFormat):
    """ITI's format: ``"Q: {question} A: {answer}"``, activation of the last token.

    Tokenized with the tokenizer's special tokens (BOS), as honest_llama does. Positives are
    labelled true, negatives false; bases are ignored.

    Attributes:
        template: the text; ``{question}`` and ``{answer}`` are filled in.
    """

    template: str = "Q: {question} A: {answer}"
    name = "iti"

    def __post_init__(self) -> None:
        _check_template("ITIFormat", self.template, "question", "answer")

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        self.check(example)
        sequences = []
        for role, r, answer in example.responses():
            text = self.template.format(question=example.prompt, answer=answer)
            ids = encode_text(tokenizer, text, add_special_tokens=True)
            sequences.append(EncodedSequence(ids, [len(ids) - 1], role, r, text))
        return EncodedExample(sequences)


_CHOICE_LETTER = re.compile(r"\s*\(?([A-Z])(?:[).:]|$)")


def choice_letter_index(answer: str) -> Optional[int]:
    """Index of the choice letter in an answer that names one (``"(A)"``, ``"A"``, ``"B."``,
    ``"(B) the sky is blue"``), or None for free text (``"The sky"``, ``"A cat"``)."""
    match = _CHOICE_LETTER.match(answer)
    return match.start(1) if match else None


@dataclass(frozen=True)
class CAAFormat(PromptFormat):
    """CAA's format: an A/B question answered with a letter; activation at the letter token.

    The example's prompt is the question with its lettered choices; each positive/negative is an
    answer such as ``"(A)"`` that names a choice letter (:func:`choice_letter_index`; free text is
    refused: convert it with :func:`actedit.data.contrast.to_ab_questions`). With
    ``chat=True`` the text is the chat template's rendering of the question with
    ``add_generation_prompt=True`` followed directly by the answer (no end-of-turn token, as in
    Rimsky et al.'s ``[/INST] (A``); with ``chat=False`` it is ``plain_template``.

    Attributes:
        chat: use the tokenizer's chat template (True), the plain template (False), or unset
            (None): the chat template when the tokenizer has one.
        system_prompt: an optional system message (chat only).
        plain_template: the text without chat template (``{prompt}``, ``{answer}``); tokenized with
            special tokens.
    """

    chat: Optional[bool] = None
    system_prompt: Optional[str] = None
    plain_template: str = "{prompt}\n\nAnswer: {answer}"
    name = "caa"

    def __post_init__(self) -> None:
        _check_template("CAAFormat plain", self.plain_template, "prompt", "answer")

    def prepare(self, dataset, seed: int = 0):
        """A/B questions: data whose answers are not all choice letters is converted with
        :func:`~actedit.data.contrast.to_ab_questions` (seeded letter order)."""
        dataset = super().prepare(dataset, seed)
        if all(choice_letter_index(t) is not None for ex in dataset for t in ex.positives + ex.negatives):
            return dataset
        return to_ab_questions(dataset, seed=seed)

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        self.check(example)
        sequences = []
        for role, r, answer in example.responses():
            letter = choice_letter_index(answer)
            if letter is None:
                raise ValueError(
                    f"example {example.id or index}: CAA answers name a choice letter, like '(A)'; got {answer!r}."
                )
            chat = has_chat_template(tokenizer) if self.chat is None else self.chat
            if chat:
                head = chat_text(tokenizer, _messages(self.system_prompt, example.prompt), add_generation_prompt=True)
                text, special = head + answer, False
                char = len(head) + letter
            else:
                head, _, _ = self.plain_template.partition("{answer}")
                head = head.format(prompt=example.prompt)
                text, special = self.plain_template.format(prompt=example.prompt, answer=answer), True
                char = len(head) + letter
            ids = encode_text(tokenizer, text, add_special_tokens=special)
            position = token_at_char(tokenizer, text, char, special, ids)
            sequences.append(EncodedSequence(ids, [position], role, r, text))
        return EncodedExample(sequences)


@dataclass(frozen=True)
class SEAFormat(PromptFormat):
    """SEA's format: prompt + completion, activation of the last token.

    Each sequence is ``preamble + template.format(prompt=...)`` followed by ``separator +
    completion`` for every base completion (``example.bases``, the model's own answers), positive
    and negative; tokenized with special tokens (BOS). With ``chat=True`` the templated prompt is
    the user message of the chat template (``add_generation_prompt=True``), as the official code
    wraps it in Llama-2-chat's ``[INST] ... [/INST]``.

    Attributes:
        template: the prompt text (``{prompt}`` filled in); the official code uses
            ``"Q: {q}\\nA:"`` after a 6-shot QA preamble.
        separator: put between prompt and completion.
        preamble: text before the templated prompt (e.g. few-shot demonstrations).
        chat: render through the chat template (True), not (False, the default), or unset (None):
            the template when the tokenizer has one.
        require_bases: raise when an example has no base completion (SEA needs three matrices);
            set False to collect positives and negatives only.
    """

    template: str = "Q: {prompt}\nA:"
    separator: str = " "
    preamble: str = ""
    chat: Optional[bool] = False
    require_bases: bool = True
    name = "sea"

    def __post_init__(self) -> None:
        _check_template("SEAFormat", self.template, "prompt")

    def prepare(self, dataset, seed: int = 0):
        """One positive and one negative per prompt (the aligned H⁺, H⁻):
        :func:`~actedit.data.contrast.first_responses` where an example has more."""
        dataset = super().prepare(dataset, seed)
        if any(len(ex.positives) > 1 or len(ex.negatives) > 1 for ex in dataset):
            return first_responses(dataset)
        return dataset

    def needs_bases(self, dataset) -> bool:
        return self.require_bases and not all(ex.bases for ex in dataset)

    def prompt_text(self, prompt: str, tokenizer) -> Tuple[str, bool]:
        """What comes before the separator for ``prompt`` (the preamble and template, rendered by
        the chat template where the format uses it), and whether encoding it adds special tokens."""
        text = self.preamble + self.template.format(prompt=prompt)
        if has_chat_template(tokenizer) if self.chat is None else self.chat:
            return chat_text(tokenizer, _messages(None, text), add_generation_prompt=True), False
        return text, True

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        self.check(example)
        if self.require_bases and not example.bases:
            raise ValueError(
                f"example {example.id or index} has no base completion; SEA needs the model's own "
                "completion of each prompt in ContrastExample.bases (or SEAFormat(require_bases=False))."
            )
        prompt, special = self.prompt_text(example.prompt, tokenizer)
        sequences = []
        for role, completions in (("pos", example.positives), ("neg", example.negatives), ("base", example.bases)):
            for r, completion in enumerate(completions):
                text = prompt + self.separator + completion
                ids = encode_text(tokenizer, text, add_special_tokens=special)
                sequences.append(EncodedSequence(ids, [len(ids) - 1], role, r, text))
        return EncodedExample(sequences)


@dataclass(frozen=True)
class ActAddFormat(PromptFormat):
    """ActAdd's format: every position of both steering prompts, padded to the same length.

    Each prompt is tokenized with special tokens (BOS included: ActAdd's matrices include it);
    the shorter one is right-padded with the token of ``pad_text`` (a space) until both have the
    same length. ``prompt1`` is role ``pos`` and ``prompt2`` role ``neg``; reading offsets are
    the positions 0..n−1.

    Attributes:
        pad_text: text whose single token pads the shorter prompt.
    """

    pad_text: str = " "
    name = "actadd"
    accepts: type = field(default=PromptPair, init=False, repr=False, compare=False)

    def prepare(self, dataset, seed: int = 0):
        """Exactly one prompt pair: ActAdd steers with one (Turner et al.: e.g. "Love" − "Hate"),
        and the per-position matrices of several pairs cannot be stacked into one."""
        if not isinstance(dataset, PromptPairDataset):
            raise ValueError(
                f"ActAdd reads prompt pairs ({{prompt1, prompt2}} records, e.g. [('Love', 'Hate')]), "
                f"got {type(dataset).__name__}."
            )
        if len(dataset) != 1:
            raise ValueError(
                f"ActAdd steers with one prompt pair (Turner et al.: e.g. 'Love' - 'Hate'), but "
                f"{dataset.name!r} holds {len(dataset)}; their per-position matrices cannot be stacked. "
                "Keep one pair (data.limit=1 takes the first) and fit one artifact per pair."
            )
        return dataset

    def encode(self, example, tokenizer, index: int = 0) -> EncodedExample:
        self.check(example)
        ids1 = encode_text(tokenizer, example.prompt1, add_special_tokens=True)
        ids2 = encode_text(tokenizer, example.prompt2, add_special_tokens=True)
        pad = encode_text(tokenizer, self.pad_text, add_special_tokens=False)
        if len(pad) != 1:
            raise ValueError(f"pad_text {self.pad_text!r} must be a single token; it tokenizes to {pad}.")
        n = max(len(ids1), len(ids2))
        ids1 = ids1 + pad * (n - len(ids1))
        ids2 = ids2 + pad * (n - len(ids2))
        return EncodedExample(
            [
                EncodedSequence(ids1, list(range(n)), "pos", 0, example.prompt1),
                EncodedSequence(ids2, list(range(n)), "neg", 0, example.prompt2),
            ]
        )


FORMATS = {cls.name: cls for cls in (HPRFormat, ITIFormat, CAAFormat, SEAFormat, ActAddFormat)}
"""Format name → class (a method's ``MethodSpec.format`` names one)."""


def get_format(spec: Union[str, PromptFormat], **params) -> PromptFormat:
    """A format instance from a name (``params`` passed to its class) or an instance."""
    if isinstance(spec, PromptFormat):
        if params:
            raise ValueError("parameters are only accepted with a format name, not an instance.")
        return spec
    key = str(spec).strip().lower()
    if key not in FORMATS:
        raise ValueError(f"unknown format {spec!r}; known: {', '.join(FORMATS)}.")
    try:
        return FORMATS[key](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for format {key!r}: {exc}") from None


__all__ = [
    "ActAddFormat",
    "CAAFormat",
    "EncodedExample",
    "EncodedSequence",
    "FORMATS",
    "HPRFormat",
    "ITIFormat",
    "PromptFormat",
    "SEAFormat",
    "chat_text",
    "choice_letter_index",
    "encode_text",
    "get_format",
    "has_chat_template",
    "pad_id",
    "token_at_char",
    "tokenizer_fingerprint",
]
