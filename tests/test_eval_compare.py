"""``actedit compare``: sampled completions with and without an edit, the side-by-side table, blind
rating sheets and their scoring.

Everything runs on a tiny random Llama with the tests' byte-level tokenizer (no downloads). The
references are independent of the code under test: ``model.generate`` seeded by hand for the
sampling contract, and ratings derived from texts whose origin the test knows for the scoring.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import actedit.interventions as ai
from actedit.cli import main
from actedit.data.models import load_model
from actedit.eval.compare import (
    BlindKey,
    BlindSheet,
    ComparisonReport,
    PromptComparison,
    blind,
    comparison_settings,
    render_side_by_side,
    sample_comparisons,
    score_blind_dir,
    score_sheet,
    write_blind,
)
from conftest import make_tokenizer, save_tiny_chat_model, tiny_model

PROMPTS = ["I hate you because", "The sky is"]
N = 4
MAX_NEW = 6
LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


def vectors(scale: float = 1.0):
    gen = torch.Generator().manual_seed(1)
    return {layer: scale * torch.randn(32, generator=gen) for layer in LAYERS}


def caa(model, multiplier: float):
    return ai.intervenable(model, ai.build_caa_config(model, vectors(), multiplier=multiplier))


def settings(**overrides):
    return comparison_settings(**{"max_new_tokens": MAX_NEW, "batch_size": 3, **overrides})


def sampled_reference(model, tok, prompt: str, n: int, seed: int, temperature: float = 1.0, top_p: float = 0.3):
    """``n`` samples of one prompt with plain ``model.generate`` on n copies of it, seeded by hand."""
    ids = torch.tensor([tok(prompt)["input_ids"]] * n)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=MAX_NEW,
            pad_token_id=0,
        )
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        row = row[: row.index(2)] if 2 in row else row
        answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


def synthetic_report(n: int = 5) -> ComparisonReport:
    """A report with distinct texts that name their origin (no model needed)."""
    comparisons = [
        PromptComparison(
            prompt=prompt,
            model_input=prompt,
            base=[f"base {i} {k}" for k in range(n)],
            edited=[f"edited {i} {k}" for k in range(n)],
        )
        for i, prompt in enumerate(["Love is", "I hate you because", "The weather"])
    ]
    return ComparisonReport(comparisons=comparisons, settings={"seed": 0}, edits=[{"method": "caa", "layers": [1]}])


# ---------------------------------------------------------------------------------- sampling
def test_noop_edit_gives_identical_columns_and_n_samples(model, tok):
    report = sample_comparisons(caa(model, 0.0), tok, PROMPTS, n=N, settings=settings(), progress=False)
    assert report.prompts == PROMPTS and report.n == N
    for comparison in report.comparisons:
        assert len(comparison.base) == len(comparison.edited) == N
        assert comparison.base == comparison.edited  # same seed, same logits: same samples
        assert comparison.model_input == comparison.prompt  # raw continuation by default
        assert len(set(comparison.base)) > 1  # it samples: the n completions are not all equal
    assert report.settings["do_sample"] and report.settings["top_p"] == 0.3 and not report.settings["chat_template"]
    assert report.edits[0]["method"] == "caa" and report.edits[0]["layers"] == list(LAYERS)
    assert report.edit_description == "caa at block_output layers [0, 1, 2]"


def test_strong_edit_changes_the_completions(model, tok):
    report = sample_comparisons(caa(model, 8.0), tok, PROMPTS, n=N, settings=settings(), progress=False)
    differing = sum(c.n_different for c in report.comparisons)
    assert differing >= len(PROMPTS) * N - 1


def test_samples_follow_the_seed_contract(model, tok):
    """Prompt i's sample k is row i*n+k, batch b of rows seeded with seed+b: with one batch per
    prompt, the base column is n seeded samples of plain ``model.generate``."""
    noop = caa(model, 0.0)
    report = sample_comparisons(noop, tok, PROMPTS, n=N, settings=settings(batch_size=N, seed=7), progress=False)
    for i, comparison in enumerate(report.comparisons):
        assert comparison.base == sampled_reference(model, tok, comparison.prompt, N, seed=7 + i)


def test_same_seed_reproduces_other_seed_differs(model, tok):
    strong = caa(model, 8.0)
    first = sample_comparisons(strong, tok, PROMPTS, n=N, settings=settings(seed=3), progress=False)
    again = sample_comparisons(strong, tok, PROMPTS, n=N, settings=settings(seed=3), progress=False)
    other = sample_comparisons(strong, tok, PROMPTS, n=N, settings=settings(seed=4), progress=False)
    assert first.comparisons == again.comparisons
    assert first.comparisons != other.comparisons


def test_chat_template_option(model, tok):
    report = sample_comparisons(
        caa(model, 0.0), tok, "Tell me a story", n=2, settings=settings(use_chat_template=True), progress=False
    )
    (comparison,) = report.comparisons
    assert comparison.prompt == "Tell me a story"
    assert comparison.model_input.startswith("<|im_start|>user\nTell me a story") and report.settings["chat_template"]


def test_greedy_settings_warn_about_identical_samples(model, tok):
    greedy = settings()
    greedy.do_sample = False
    with pytest.warns(UserWarning, match="identical completions"):
        report = sample_comparisons(caa(model, 0.0), tok, PROMPTS[:1], n=2, settings=greedy, progress=False)
    assert len(set(report.comparisons[0].base)) == 1


# ---------------------------------------------------------------------------------- report
def test_report_json_round_trip(model, tok, tmp_path):
    report = sample_comparisons(caa(model, 8.0), tok, PROMPTS, n=2, settings=settings(), progress=False)
    path = report.save(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["kind"] == "actedit-comparison" and data["n"] == 2
    assert [c["prompt"] for c in data["comparisons"]] == PROMPTS
    assert data["edit_description"] == report.edit_description
    assert ComparisonReport.load(path) == report
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temporary file
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(ValueError, match="not a comparison report"):
        ComparisonReport.load(tmp_path / "other.json")


def test_side_by_side_rendering():
    long_base = "word " * 30
    report = ComparisonReport(
        comparisons=[
            PromptComparison("Love is", "Love is", [long_base.strip(), "same", ""], ["short", "same", "x\ny"]),
        ],
        settings={},
        model="tiny",
        edits=[{"method": "actadd", "component": "block_input", "layers": [6]}],
    )
    text = render_side_by_side(report, width=60)
    lines = text.splitlines()
    assert lines[0] == "edit: actadd at block_input layers [6] on tiny"
    assert "prompt 1/1: 'Love is' (2 of 3 pairs differ)" in text
    header = lines.index("base" + " " * 24 + " | edited")
    assert set(lines[header + 1]) == {"=", "+"}
    assert all(len(line) <= 60 for line in lines)
    separators = [line for line in lines if set(line) == {"-", "+"}]
    assert len(separators) == 2  # between the 3 samples
    first_sample = lines[header + 2 : lines.index(separators[0])]
    assert len(first_sample) > 1  # wrapped
    assert " ".join(line[:28] for line in first_sample).split() == long_base.split()  # nothing lost
    assert first_sample[0][28:] == " | short"
    assert "(empty) " in text and "| x" in text and "| y" in text  # empty shown; line breaks kept
    assert report.table(width=60) == text
    with pytest.raises(ValueError, match="width"):
        render_side_by_side(report, width=10)


# ---------------------------------------------------------------------------------- blind rating
def test_blind_sheet_hides_labels_and_key_maps_every_id(tmp_path):
    report = synthetic_report()
    sheet_path, key_path = write_blind(report, tmp_path / "rating", seed=0, question="How happy is this completion?")
    assert sheet_path.name == "sheet.json" and key_path.name == "key.json"
    sheet_text = sheet_path.read_text(encoding="utf-8")
    data = json.loads(sheet_text)
    assert data["question"] == "How happy is this completion?"
    for item in data["prompts"]:
        for completion in item["completions"]:
            assert set(completion) == {"id", "text", "rating"} and completion["rating"] is None
    # no trace of which model wrote a completion: the labels appear only in the texts made to carry them
    without_texts = json.dumps({**data, "prompts": [[c["id"] for c in p["completions"]] for p in data["prompts"]]})
    assert "base" not in without_texts and "edited" not in without_texts
    key = json.loads(key_path.read_text())
    ids = [c["id"] for p in data["prompts"] for c in p["completions"]]
    assert len(ids) == len(set(ids)) == 3 * 2 * 5
    assert set(key["labels"]) == set(ids)
    texts = {c["id"]: c["text"] for p in data["prompts"] for c in p["completions"]}
    for completion_id, label in key["labels"].items():
        assert texts[completion_id].startswith(label + " ")  # the key tells the truth
    for item, comparison in zip(data["prompts"], report.comparisons, strict=True):
        assert item["prompt"] == comparison.prompt
        assert sorted(c["text"] for c in item["completions"]) == sorted(comparison.base + comparison.edited)


def test_blind_shuffle_depends_on_the_seed():
    report = synthetic_report()

    def order(sheet: BlindSheet):
        return [[c.text for c in p.completions] for p in sheet.prompts]

    sheet0, key0 = blind(report, 0)
    again0, again_key0 = blind(report, 0)
    sheet1, key1 = blind(report, 1)
    assert order(sheet0) == order(again0) and key0 == again_key0 and sheet0 == again0
    assert order(sheet0) != order(sheet1) and set(key0.labels) != set(key1.labels)
    straight = [c.base + c.edited for c in report.comparisons]
    assert order(sheet0) != straight  # actually shuffled
    assert key0.sheet_id == sheet0.sheet_id != sheet1.sheet_id


def test_scoring_a_filled_sheet(tmp_path):
    report = synthetic_report()
    sheet_path, _ = write_blind(report, tmp_path, seed=5)
    data = json.loads(sheet_path.read_text(encoding="utf-8"))
    rng = random.Random(0)
    rating_of = {}  # text -> rating, or None (left unrated)
    for item in data["prompts"]:
        for completion in item["completions"]:
            value = rng.choice([None, 1, 2, 3, 4.5, 5])
            completion["rating"] = value
            rating_of[completion["text"]] = value
    sheet_path.write_text(json.dumps(data), encoding="utf-8")

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    scores = score_blind_dir(tmp_path)
    all_base, all_edited = [], []
    for score, comparison in zip(scores.prompts, report.comparisons, strict=True):
        base = [rating_of[t] for t in comparison.base]
        edited = [rating_of[t] for t in comparison.edited]
        all_base += base
        all_edited += edited
        assert score.prompt == comparison.prompt
        assert score.base_mean == pytest.approx(mean(base)) and score.edited_mean == pytest.approx(mean(edited))
        assert score.base_rated == sum(v is not None for v in base)
        assert score.unrated == sum(v is None for v in base + edited)
    assert scores.overall.base_mean == pytest.approx(mean(all_base))
    assert scores.overall.edited_mean == pytest.approx(mean(all_edited))
    assert scores.overall.difference == pytest.approx(mean(all_edited) - mean(all_base))
    table = scores.table()
    assert "overall" in table and f"{mean(all_base):.2f}" in table and f"{mean(all_edited):.2f}" in table


def test_key_that_does_not_match_the_sheet(tmp_path):
    report = synthetic_report()
    sheet, key = blind(report, 0)
    _, other_key = blind(report, 1)
    with pytest.raises(ValueError, match="the key does not match the sheet.*same blind\\(\\) call"):
        score_sheet(sheet, other_key)
    partial = BlindKey(key.sheet_id, dict(list(key.labels.items())[:-1]), key.seed)
    with pytest.raises(ValueError, match="1 sheet ids are not in the key"):
        score_sheet(sheet, partial)
    smaller, smaller_key = blind(synthetic_report(n=2), 0)
    with pytest.raises(ValueError, match="the key does not match the sheet"):
        score_sheet(smaller, key)
    assert score_sheet(smaller, smaller_key).overall.unrated == 3 * 2 * 2


def test_bad_ratings_and_files(tmp_path):
    sheet_path, key_path = write_blind(synthetic_report(), tmp_path, seed=0)
    data = json.loads(sheet_path.read_text())
    bad_id = data["prompts"][0]["completions"][0]["id"]
    data["prompts"][0]["completions"][0]["rating"] = "4"
    sheet_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"completion {bad_id}: rating '4' is not a number.*without quotes"):
        score_blind_dir(tmp_path)
    with pytest.raises(ValueError, match="not a blind rating sheet"):
        BlindSheet.load(key_path)
    with pytest.raises(FileNotFoundError, match="sheet.json"):
        score_blind_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(model, tok):
    edited = caa(model, 1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        sample_comparisons(edited, tok, [], n=2, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is '  '.*non-empty"):
        sample_comparisons(edited, tok, ["ok", "  "], n=2, progress=False)
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be a positive integer"):
            sample_comparisons(edited, tok, PROMPTS, n=n, progress=False)
    with pytest.raises(ValueError, match="must be a pyvene IntervenableModel.*load_artifact"):
        sample_comparisons(model, tok, PROMPTS, n=2, progress=False)
    with pytest.raises(ValueError, match="same number of samples"):
        ComparisonReport(
            comparisons=[PromptComparison("a", "a", ["x"], ["y"]), PromptComparison("b", "b", ["x", "z"], ["y", "w"])],
            settings={},
        )
    with pytest.raises(ValueError, match="as many edited as base"):
        PromptComparison("a", "a", ["x", "z"], ["y"])
    with pytest.raises(ValueError, match="top_p"):
        comparison_settings(top_p=0.0)


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A CAA artifact made on a tiny model loaded with ``load_model`` (so it records its path)."""
    root = tmp_path_factory.mktemp("compare_cli")
    model_dir = save_tiny_chat_model(root)
    model, _ = load_model(str(model_dir))
    pvm = ai.intervenable(model, ai.build_caa_config(model, vectors(), multiplier=8.0))
    return ai.save_artifact(pvm, root / "caa-edit")


def test_cli_end_to_end(artifact, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The sky is\n\n")
    blind_dir = tmp_path / "rating"
    argv = ["compare", str(artifact), "--prompt", "I hate you because", "--prompts-file", str(prompts_file)]
    argv += ["-n", "3", "--max-new-tokens", "5", "--seed", "1", "--width", "80", "--blind", str(blind_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "caa at block_output layers [0, 1, 2]" in out
    assert "prompt 1/2: 'I hate you because'" in out and "prompt 2/2: 'The sky is'" in out
    default_out = artifact.parent / "caa-edit_compare.json"
    report = ComparisonReport.load(default_out)
    assert report.prompts == PROMPTS and report.n == 3 and report.settings["seed"] == 1
    assert report.settings["max_new_tokens"] == 5 and report.settings["top_p"] == 0.3
    assert report.table(width=80) in out
    sheet, key = BlindSheet.load(blind_dir / "sheet.json"), BlindKey.load(blind_dir / "key.json")
    assert len(sheet.ids) == 2 * 2 * 3 and set(sheet.ids) == set(key.labels) and key.seed == 1
    # the rater fills in the sheet; the score command unblinds it
    data = json.loads((blind_dir / "sheet.json").read_text())
    for item in data["prompts"]:
        for completion in item["completions"]:
            completion["rating"] = 5 if key.labels[completion["id"]] == "edited" else 1
    (blind_dir / "sheet.json").write_text(json.dumps(data))
    scores_path = tmp_path / "scores.json"
    assert main(["compare", "--score-sheet", str(blind_dir), "--out", str(scores_path)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "1.00 (6)" in out and "5.00 (6)" in out and "+4.00" in out
    assert json.loads(scores_path.read_text())["overall"]["difference"] == 4.0
    # --out elsewhere and the same seed: the same report
    again = ["compare", str(artifact), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "-n", "3", "--seed", "1"]
    assert main(again + ["--max-new-tokens", "5", "--out", str(tmp_path / "again.json")]) == 0
    assert ComparisonReport.load(tmp_path / "again.json").comparisons == report.comparisons


def test_cli_errors_are_one_line(artifact, tmp_path, capsys):
    cases = [
        (["compare", str(artifact)], "give at least one --prompt"),
        (["compare"], "give an ARTIFACT"),
        (["compare", str(artifact), "--prompt", "x", "-n", "0"], "-n must be at least 1"),
        (["compare", str(artifact), "--prompt", "x", "--top-p", "2"], "top_p must lie in (0, 1]"),
        (["compare", str(artifact), "--prompts-file", str(tmp_path / "nope.txt")], "No prompts file"),
        (["compare", str(tmp_path / "missing"), "--prompt", "x"], "No artifact directory"),
        (["compare", str(artifact), "--score-sheet", str(tmp_path)], "not both"),
        (["compare", str(artifact), "--prompt", "x", "--system", "Be kind."], "add --chat-template"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("actedit compare: error: ") and message in err and "Traceback" not in err, err
