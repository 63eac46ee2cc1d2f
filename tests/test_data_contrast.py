"""Contrast data: the data model (examples, prompt pairs, datasets, splits, digests), the JSONL
loaders and the conversions (A/B questions, first responses, bases). Tasks' contrast data:
test_data_truthfulqa.py, test_data_bigbench.py, test_data_toxigen.py; formats: test_data_formats.py."""

from __future__ import annotations

import json

import pytest

from actedit.data import contrast as D
from actedit.data.contrast import (
    ContrastDataset,
    ContrastExample,
    PromptPair,
    PromptPairDataset,
    load_contrast_jsonl,
    load_prompt_pairs_jsonl,
)
from actedit.data.tasks import load_contrast


def example(i=0, **meta):
    """A question with two true and three false answers (``id`` ex<i>)."""
    return ContrastExample(
        f"Is the sky blue number {i}?",
        ["Yes it is.", "It is blue."],
        ["No it is not.", "The sky is green.", "Never."],
        {"id": f"ex{i}", **meta},
    )


# ---------------------------------------------------------------------------- data model
def test_example_validation_messages():
    with pytest.raises(ValueError, match="prompt is empty"):
        ContrastExample("  ", ["a"], ["b"])
    with pytest.raises(ValueError, match="no positive"):
        ContrastExample("q", [], ["b"])
    with pytest.raises(ValueError, match="no negative"):
        ContrastExample("q", ["a"], [], {"id": 7})
    with pytest.raises(ValueError, match="both a positive and a negative"):
        ContrastExample("q", ["a", "b"], ["b"])
    with pytest.raises(ValueError, match=r"positives\[1\] is empty"):
        ContrastExample("q", ["a", ""], ["b"])
    with pytest.raises(ValueError, match="must be a string"):
        ContrastExample("q", ["a", 3], ["b"])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ContrastExample("q", ["a"], ["b"], {"x": object()})
    one = ContrastExample("q", "a", "b")  # a single string is one response
    assert one.positives == ["a"] and one.negatives == ["b"] and one.num_pairs == 1
    with pytest.raises(ValueError, match="identical"):
        PromptPair("Love", "Love")
    with pytest.raises(ValueError, match="prompt2 must be a non-empty string"):
        PromptPair("Love", "")


def test_dataset_behaviour(tmp_path):
    ds = ContrastDataset([example(i) for i in range(5)], name="toy")
    assert len(ds) == 5 and ds.num_pairs == 5 * 6
    triples = list(ds.pairs())
    assert len(triples) == 30 and triples[0] == (ds[0].prompt, "Yes it is.", "No it is not.")
    assert isinstance(ds[1:3], ContrastDataset) and len(ds[1:3]) == 2
    assert [x.id for x in ds.select([4, 0])] == ["ex4", "ex0"]
    with pytest.raises(ValueError, match="is empty"):
        ContrastDataset([], name="nothing")
    with pytest.raises(ValueError, match="is empty"):
        ds.filter(lambda x: False)
    with pytest.raises(ValueError, match="not a ContrastExample"):
        ContrastDataset([PromptPair("a", "b")])
    train, evals = ds.train_eval_split(eval_ratio=0.4, seed=3)
    assert len(train) == 3 and len(evals) == 2
    assert {x.id for x in train} | {x.id for x in evals} == {x.id for x in ds}
    assert train.splits == ["train"] and evals.splits == ["eval"]
    assert [x.id for x in ds.train_eval_split(0.4, seed=3)[1]] == [x.id for x in evals]  # seeded
    merged = ContrastDataset(list(train) + list(evals))
    assert len(merged.split("eval")) == 2
    with pytest.raises(ValueError, match="no example in split 'test'"):
        merged.split("test")
    # digest: stable, order- and content-sensitive
    assert ds.digest() == ContrastDataset([example(i) for i in range(5)]).digest()
    assert ds.digest() != ds.select([1, 0, 2, 3, 4]).digest()
    # JSONL round trip
    path = ds.with_split("train").to_jsonl(tmp_path / "toy.jsonl")
    back = load_contrast_jsonl(path)
    assert [x.positives for x in back] == [x.positives for x in ds]
    assert back[2].metadata["split"] == "train" and back[2].id == "ex2"
    pairs = PromptPairDataset([PromptPair("Love", "Hate", {"id": 1})])
    pairs_back = load_prompt_pairs_jsonl(pairs.to_jsonl(tmp_path / "pairs.jsonl"))
    assert pairs_back[0].prompt1 == "Love" and pairs_back[0].id == 1


# ------------------------------------------------------------------------------------ JSONL
def test_contrast_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "p1", "positive": "good", "negative": "bad", "id": "a", "category": "x"}),
                "",
                json.dumps(
                    {
                        "prompt": "p2",
                        "positives": ["g1", "g2"],
                        "negatives": ["b1"],
                        "base": "meh",
                        "metadata": {"split": "eval"},
                    }
                ),
            ]
        )
        + "\n"
    )
    ds = load_contrast_jsonl(path)
    assert ds.name == "mine" and len(ds) == 2
    assert ds[0].metadata == {"id": "a", "category": "x", "line": 1}
    assert ds[1].positives == ["g1", "g2"] and ds[1].bases == ["meh"] and ds[1].split == "eval"
    assert isinstance(load_contrast(path), ContrastDataset)

    def bad(lines, match):
        p = tmp_path / "bad.jsonl"
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            load_contrast_jsonl(p)

    good = json.dumps({"prompt": "p", "positive": "a", "negative": "b"})
    bad([good, good, "{not json"], r"bad.jsonl:3: not valid JSON")
    bad([good, json.dumps({"positive": "a", "negative": "b"})], r":2: missing 'prompt'")
    bad([json.dumps({"prompt": "p", "positive": "a", "positives": ["c"], "negative": "b"})], "not both")
    bad([json.dumps({"prompt": "p", "positive": "a"})], r":1: missing 'negative'")
    bad([json.dumps({"prompt": "p", "positive": "a", "negative": "a"})], r":1: .*both a positive and a negative")
    bad([json.dumps(["a", "b"])], "must be a JSON object")
    bad([json.dumps({"prompt": "p", "positive": ["a"], "negative": "b"})], "use 'positives' for a list")
    bad([""], "holds no examples")
    with pytest.raises(FileNotFoundError, match="No such JSONL file"):
        load_contrast_jsonl(tmp_path / "absent.jsonl")


def test_prompt_pairs_jsonl(tmp_path):
    path = tmp_path / "steer.jsonl"
    path.write_text(
        json.dumps({"prompt1": "Love", "prompt2": "Hate"})
        + "\n"
        + json.dumps({"positive": "I talk about weddings constantly", "negative": " "})
        + "\n"
    )
    pairs = load_prompt_pairs_jsonl(path)
    assert isinstance(pairs, PromptPairDataset) and pairs[1].prompt2 == " "
    assert isinstance(load_contrast(path), PromptPairDataset)
    path.write_text(json.dumps({"prompt1": "Love"}) + "\n")
    with pytest.raises(ValueError, match=r"steer.jsonl:1: missing 'prompt2'"):
        load_prompt_pairs_jsonl(path)


def test_loader_module_exports():
    from actedit.data.tasks import task_names

    assert {"truthfulqa", "bbq", "seq", "toxigen"} <= set(task_names())
    assert D.ROLES == ("pos", "neg", "base")


# ------------------------------------------------------------------------------- conversions
def test_ab_questions_hold_one_true_and_one_false_choice_in_seeded_order():
    ds = D.ContrastDataset(
        [
            D.ContrastExample(
                f"Question {i}?",
                [f"true {i}", f"also true {i}"],
                [f"false {i}a", f"false {i}b", f"false {i}c"],
                {"id": f"q{i}"},
            )
            for i in range(40)
        ]
    )
    ab = D.to_ab_questions(ds, seed=3)
    assert len(ab) == 40 and ab.name.endswith("/ab")
    letters = []
    for ex, src in zip(ab, ds, strict=True):
        assert ex.prompt.startswith(src.prompt + "\n\n(A) ")
        true_letter = ex.positives[0][1]
        assert ex.positives[0] in ("(A)", "(B)") and ex.negatives[0] in ("(A)", "(B)") and ex.positives != ex.negatives
        lines = dict(line.split(" ", 1) for line in ex.prompt.split("\n\n", 1)[1].splitlines())
        assert lines[f"({true_letter})"] == src.positives[0]  # the best answer against ...
        other = "B" if true_letter == "A" else "A"
        assert lines[f"({other})"] in src.negatives  # ... one false answer
        assert ex.metadata["ab_true"] == true_letter and ex.id == src.id
        letters.append(true_letter)
    assert 10 <= letters.count("A") <= 30  # both orders occur
    assert [e.prompt for e in D.to_ab_questions(ds, seed=3)] == [e.prompt for e in ab]  # seeded
    assert D.to_ab_questions(ds.select(range(5, 10)), seed=3)[0].prompt == ab[5].prompt  # per example
    several = D.to_ab_questions(ds, seed=3, pairs_per_example=3)
    assert len(several) == 120 and several[0].id == "q0/ab0"
    assert len({e.prompt for e in several.examples[:3]}) == 3  # three different false answers
    with pytest.raises(ValueError, match="pairs_per_example"):
        D.to_ab_questions(ds, pairs_per_example=0)
    with pytest.raises(ValueError, match=r"\{b\}"):
        D.to_ab_questions(ds, template="{prompt} {a}")


def test_first_responses_and_with_bases():
    ds = D.ContrastDataset([D.ContrastExample("Q?", ["t1", "t2"], ["f1", "f2"], {"id": 1})])
    first = D.first_responses(ds)
    assert first[0].positives == ["t1"] and first[0].negatives == ["f1"] and first[0].id == 1
    based = D.with_bases(first, ["my own answer"])
    assert based[0].bases == ["my own answer"] and first[0].bases == []
    with pytest.raises(ValueError, match="1 examples"):
        D.with_bases(first, ["a", "b"])
