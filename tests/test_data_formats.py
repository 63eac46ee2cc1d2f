"""Prompt formats: the text and token ids each method's format builds from an example, and the
positions it reads: every read position points at the response's tokens (HPR: every response
token; ITI and SEA: its last token; CAA: the answer letter; ActAdd: every position of the padded
steering prompts)."""

from __future__ import annotations

import random

import pytest
from test_data_contrast import example

from actedit.data.contrast import ContrastExample, PromptPair
from actedit.data.formats import (
    ActAddFormat,
    CAAFormat,
    HPRFormat,
    ITIFormat,
    SEAFormat,
    choice_letter_index,
    get_format,
)
from conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_hpr_format_text_and_positions(tok):
    ex = ContrastExample("What color is the sky?", ["Blue.", "Light blue."], ["Green."], {"id": "sky"})
    fmt = HPRFormat(seed=1)
    user, pos, neg = fmt.choices(ex)
    order = list(range(3))
    random.Random("hpr:1:sky").shuffle(order)
    raw = ["Blue.", "Light blue.", "Green."]
    lettered = [f"{'ABC'[i]}. {raw[j]}" for i, j in enumerate(order)]
    assert user == "Question: What color is the sky?\nChoices:\n" + "\n".join(lettered) + "\nAnswer:\n"
    assert sorted(pos + neg) == sorted(lettered) and len(pos) == 2
    assert neg == [lettered[order.index(2)]]
    assert fmt.choices(ex) == HPRFormat(seed=1).choices(ex)  # deterministic
    assert {HPRFormat(seed=s).choices(ex)[0] for s in range(8)} != {user}  # the seed matters
    enc = fmt.encode(ex, tok)
    assert [s.role for s in enc.sequences] == ["pos", "pos", "neg"]
    question = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    start = len(tok(question, add_special_tokens=False)["input_ids"])
    for seq, response in zip(enc.sequences, pos + neg, strict=True):
        full = tok.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": response}], tokenize=False
        )
        assert seq.ids == tok(full, add_special_tokens=False)["input_ids"]
        assert seq.read_positions == list(range(start, len(seq.ids)))
        assert tok.decode(seq.ids[start:]) == response + "<|im_end|>\n"
    short = HPRFormat(seed=1, include_end_tokens=False).encode(ex, tok)
    for seq, response in zip(short.sequences, pos + neg, strict=True):
        assert tok.decode([seq.ids[p] for p in seq.read_positions]) == response
    plain = HPRFormat(lettered=False).encode(ex, tok)
    assert "Choices" not in plain.sequences[0].text and plain.sequences[2].text.endswith("Green.<|im_end|>\n")
    too_many = ContrastExample("q", [f"a{i}" for i in range(20)], [f"b{i}" for i in range(7)])
    with pytest.raises(ValueError, match="at most 26"):
        fmt.encode(too_many, tok)


def test_iti_caa_sea_actadd_formats(tok):
    ex = ContrastExample("Is the sky blue?", ["Yes it is."], ["No it is not.", "Never."], bases=["The sky is blue."])
    iti = ITIFormat().encode(ex, tok)
    assert [s.text for s in iti.sequences] == [
        "Q: Is the sky blue? A: Yes it is.",
        "Q: Is the sky blue? A: No it is not.",
        "Q: Is the sky blue? A: Never.",
    ]
    for s in iti.sequences:
        assert s.ids[0] == tok.bos_token_id and s.read_positions == [len(s.ids) - 1]
    ab = ContrastExample("Which is right?\n(A) the sky is blue\n(B) the sky is green", ["(A)"], ["(B)"])
    caa = CAAFormat().encode(ab, tok)
    for s, letter in zip(caa.sequences, "AB", strict=True):
        assert s.text.endswith(f"<|im_start|>assistant\n({letter})")
        assert tok.decode([s.ids[s.read_positions[0]]]).strip().endswith(letter)
        assert tok.decode(s.ids[: s.read_positions[0] + 1]).endswith(f"({letter}")
    plain = CAAFormat(chat=False).encode(ab, tok)
    assert plain.sequences[1].text.endswith("Answer: (B)") and plain.sequences[1].ids[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="choice letter"):
        CAAFormat().encode(ContrastExample("q", ["yes"], ["no"]), tok)
    sea = SEAFormat().encode(ex, tok)
    assert [s.role for s in sea.sequences] == ["pos", "neg", "neg", "base"]
    assert sea.sequences[3].text == "Q: Is the sky blue?\nA: The sky is blue."
    assert all(s.read_positions == [len(s.ids) - 1] for s in sea.sequences)
    with pytest.raises(ValueError, match="no base completion"):
        SEAFormat().encode(ContrastExample("q", ["a"], ["b"]), tok)
    assert len(SEAFormat(require_bases=False).encode(ContrastExample("q", ["a"], ["b"]), tok).sequences) == 2
    pair = PromptPair("Love", "Hate I talk about weddings")
    act = ActAddFormat().encode(pair, tok)
    a, b = act.sequences
    assert len(a.ids) == len(b.ids) and a.read_positions == list(range(len(a.ids)))
    assert a.ids[0] == tok.bos_token_id and a.ids[-1] == tok(" ", add_special_tokens=False)["input_ids"][0]
    assert (a.role, b.role) == ("pos", "neg")
    with pytest.raises(ValueError, match="reads PromptPair"):
        ActAddFormat().encode(ex, tok)
    with pytest.raises(ValueError, match="reads ContrastExample"):
        ITIFormat().encode(pair, tok)


def test_format_registry_and_chat_errors(tok):
    assert get_format("hpr", seed=3) == HPRFormat(seed=3)
    assert get_format(ITIFormat()) == ITIFormat()
    assert HPRFormat(seed=2).params() == {
        "name": "hpr",
        "lettered": True,
        "shuffle": True,
        "seed": 2,
        "system_prompt": None,
        "include_end_tokens": True,
        "chat": None,
    }
    with pytest.raises(ValueError, match="unknown format"):
        get_format("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        get_format("iti", seed=1)
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{answer\}"):
        ITIFormat(template="Q: {question}")
    with pytest.raises(ValueError, match="lacks"):
        CAAFormat(plain_template="{prompt}")
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        HPRFormat(chat=True).encode(example(), no_template)


def test_choice_letters_are_told_from_free_text():
    for answer, index in (("(A)", 1), ("A", 0), ("B.", 0), (" (C) the sky is blue", 2), ("D)", 0), ("E:", 0)):
        assert choice_letter_index(answer) == index, answer
    for answer in ("The sky", "A cat", "yes", "(a)", ""):
        assert choice_letter_index(answer) is None, answer


# ------------------------------------------------------- read positions point at the response
FREE_TEXT = ContrastExample(
    "Is the sky blue?", ["Yes it is."], ["No it is not.", "The sky is green."], {"id": "sky"}, bases=["It is blue."]
)
AB = ContrastExample("Which is right?\n(A) the sky is blue\n(B) the sky is green", ["(A)"], ["(B)"])
FORMATS = {
    "hpr-chat": (HPRFormat(seed=1, include_end_tokens=False), FREE_TEXT),
    "hpr-plain": (HPRFormat(seed=1, chat=False), FREE_TEXT),
    "iti": (ITIFormat(), FREE_TEXT),
    "sea": (SEAFormat(), FREE_TEXT),
    "sea-chat": (SEAFormat(chat=True), FREE_TEXT),
    "caa-chat": (CAAFormat(chat=True), AB),
    "caa-plain": (CAAFormat(chat=False), AB),
}


def response_texts(fmt, ex):
    """(role, response index) → the text the sequence answers with, from the example itself."""
    if isinstance(fmt, HPRFormat):
        _, positives, negatives = fmt.choices(ex)
    else:
        positives, negatives = ex.positives, ex.negatives
    texts = {("pos", i): t for i, t in enumerate(positives)} | {("neg", i): t for i, t in enumerate(negatives)}
    if isinstance(fmt, SEAFormat):
        texts |= {("base", i): t for i, t in enumerate(ex.bases)}
    return texts


def last_read_token_ends(tok, seq, text):
    """Whether the token at the last read position is the one that completes ``text``: the tokens up
    to it decode to something ending in ``text``, the tokens before it do not."""
    p = seq.read_positions[-1]
    return tok.decode(seq.ids[: p + 1]).endswith(text) and not tok.decode(seq.ids[:p]).endswith(text)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_read_positions_point_at_the_response_tokens(tok, name):
    fmt, ex = FORMATS[name]
    texts = response_texts(fmt, ex)
    sequences = fmt.encode(ex, tok).sequences
    assert sorted((s.role, s.response) for s in sequences) == sorted(texts)  # each response once
    for seq in sequences:
        text, read = texts[(seq.role, seq.response)], seq.read_positions
        if isinstance(fmt, HPRFormat):  # every token of the response, and nothing else
            first, last = read[0], read[-1]
            assert read == list(range(first, last + 1))
            assert tok.decode(seq.ids[first : last + 1]) == text
            assert tok.decode(seq.ids[:first]) + text == tok.decode(seq.ids[: last + 1])
        elif isinstance(fmt, CAAFormat):  # the token holding the choice letter
            letter = choice_letter_index(text)
            assert len(read) == 1 and last_read_token_ends(tok, seq, text[: letter + 1])
        else:  # the last token, which ends the response
            assert read == [len(seq.ids) - 1] and last_read_token_ends(tok, seq, text)


def test_actadd_reads_every_position_of_both_padded_prompts(tok):
    pair = PromptPair("Love", "Hate")
    first, second = ActAddFormat().encode(pair, tok).sequences
    ids1, ids2 = tok("Love").input_ids, tok("Hate").input_ids
    (space,) = tok(" ", add_special_tokens=False).input_ids
    n = max(len(ids1), len(ids2))
    assert first.ids == ids1 + [space] * (n - len(ids1)) and second.ids == ids2 + [space] * (n - len(ids2))
    assert first.read_positions == second.read_positions == list(range(n))
    assert (first.role, second.role) == ("pos", "neg")
    with pytest.raises(ValueError, match="must be a single token"):
        ActAddFormat(pad_text="Love Hate").encode(pair, tok)
