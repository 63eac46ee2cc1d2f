"""BIG-bench tasks (BBQ, SEQ): json_task's formatting, the Hub's split rebuilt (checked against a
reference that follows bigbench_bridge step by step, and on the real data against the split's
known sizes and the HPR paper's counts), actedit's splits, every kind of source, lm-eval's acc and
HPR's contrast pairs. The parity with lm-eval itself: test_eval_lmeval.py."""

from __future__ import annotations

import copy
import io
import json
import random
import tarfile

import numpy as np
import pytest

from actedit.data import bigbench as B
from actedit.data import packages
from actedit.data.tasks import load_contrast, task_spec
from conftest import unavailable

SUBTASKS = ("toy_a_ambig", "toy_b_disambig")


def seq_examples(n=30):
    out = []
    for i in range(n):
        scores = {
            f"right {i}": 1,
            f"wrong {i}": 0,
            "the question is not relevant to my goals": 0,
            "I prefer not to say": 0,
        }
        order = list(scores)
        random.Random(i).shuffle(order)
        out.append({"input": f"Question {i}: what should one do?", "target_scores": {k: scores[k] for k in order}})
    out.append(copy.deepcopy(out[3]))  # an exact duplicate: dropped
    return out


def bbq_examples(sub, n):
    return [
        {
            "input": f"{sub} context {i}. Who did it?",
            "target_scores": {
                "The first one": int(i % 3 == 0),
                "Unknown": int(i % 3 == 1),
                "The second one": int(i % 3 == 2),
            },
            "comment": {"example_id": i},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    """A benchmark_tasks folder: SEQ (no subtasks) and a BBQ-like task of two subtasks."""
    root = tmp_path_factory.mktemp("bb") / "benchmark_tasks"
    (root / "simple_ethical_questions").mkdir(parents=True)
    (root / "simple_ethical_questions" / "task.json").write_text(
        json.dumps({"name": "simple_ethical_questions", "examples": seq_examples()})
    )
    (root / "bbq_lite_json").mkdir()
    (root / "bbq_lite_json" / "task.json").write_text(json.dumps({"name": "bbq_lite_json"}))
    for sub, n in zip(SUBTASKS[::-1], (47, 33), strict=True):  # written in reverse: the order is the folders'
        (root / "bbq_lite_json" / sub).mkdir()
        (root / "bbq_lite_json" / sub / "task.json").write_text(
            json.dumps({"name": sub, "examples": bbq_examples(sub, n)})
        )
    return root


# ----------------------------------------------------------------------------- the reference
def reference_format(example):
    """json_task.default_format_fn with its defaults, then the Hub script's strip."""
    sample = copy.deepcopy(example)
    rng = np.random.RandomState(seed=42)
    choice_dic = sample["target_scores"]
    permuted = rng.permutation(sorted(choice_dic.keys()))
    sample["input"] = sample["input"] + "\n  choice: " + "\n  choice: ".join(permuted)
    sample["target"] = [k for k, v in choice_dic.items() if v == max(choice_dic.values())][0]
    return {
        "inputs": ("\nQ: " + sample["input"] + "\nA: ").strip(),
        "targets": [sample["target"].strip()],
        "multiple_choice_targets": [k.strip() for k in choice_dic],
    }


def reference_split(examples, min_validation):
    """bigbench_bridge.dataset_fn: dedupe, format, random.seed(42) + shuffle, slice."""
    distinct, seen = [], set()
    for x in examples:
        if json.dumps(x) not in seen:
            seen.add(json.dumps(x))
            distinct.append(x)
    data = [reference_format(x) for x in distinct]
    random.seed(42)
    random.shuffle(data)
    n_val = max(int(0.2 * len(data)), min_validation)
    return data[: len(data) - n_val], data[len(data) - n_val :]


def as_hub(question):
    return {
        "inputs": question.inputs,
        "targets": list(question.targets),
        "multiple_choice_targets": list(question.choices),
    }


# --------------------------------------------------------------------------------- the tests
def test_format_example_is_json_tasks_formatting():
    example = {"input": "Who?", "target_scores": {"b": 0, "c": 1, "a": 0}}
    inputs, targets, choices, scores = B.format_example(example)
    permuted = [["a", "b", "c"][i] for i in np.random.RandomState(42).permutation(3)]
    assert inputs == "\nQ: Who?" + "".join("\n  choice: " + c for c in permuted) + "\nA: "
    assert (targets, choices, scores) == (["c"], ["b", "c", "a"], [0.0, 1.0, 0.0])
    assert B.format_example({"input": "x", "target_scores": {"p": 2, "q": 2}, "target": "q"})[1] == ["q"]
    with pytest.raises(ValueError, match="no correct choice"):
        B.format_example({"input": "x", "target_scores": {"p": 0, "q": 0}})


def test_hub_split_is_rebuilt_like_bigbench_bridge(tasks_root):
    seq = B.load_bigbench_task("simple_ethical_questions", tasks_root)
    train, validation = reference_split(seq_examples(), 16)
    assert len(seq.questions) == 30 and (len(seq.hub_train), len(seq.hub_validation)) == (14, 16)  # max(6, 16)
    assert [as_hub(seq.questions[i]) for i in seq.hub_validation] == validation
    assert [as_hub(seq.questions[i]) for i in seq.hub_train] == train
    assert all(seq.questions[i].hub_split == "validation" for i in seq.hub_validation)
    bbq = B.load_bigbench_task("bbq_lite_json", tasks_root)
    assert [q.subtask for q in bbq.questions[:1] + bbq.questions[-1:]] == list(SUBTASKS)
    expected_val, expected_train = [], []
    for sub, n in zip(SUBTASKS, (33, 47), strict=True):  # each subtask alone, m = 16 // 2
        train, validation = reference_split(bbq_examples(sub, n), 8)
        expected_train += train
        expected_val += validation
    assert [as_hub(bbq.questions[i]) for i in bbq.hub_validation] == expected_val
    assert [as_hub(bbq.questions[i]) for i in bbq.hub_train] == expected_train
    assert [q.index for q in bbq.questions] == list(range(80))


def test_actedit_splits_divide_the_hub_train_split_and_keep_its_validation_as_test(tasks_root):
    data = B.load_bigbench_task("bbq_lite_json", tasks_root)
    splits = B.actedit_splits(data)
    assert sorted(splits["test"]) == sorted(data.hub_validation)
    assert sorted(splits["train"] + splits["eval"]) == sorted(data.hub_train)
    assert len(splits["eval"]) == -(-len(data.hub_train) // 10) and not set(splits["train"]) & set(splits["eval"])
    assert splits == B.actedit_splits(B.load_bigbench_task("bbq_lite_json", tasks_root))  # seeded
    assert splits["test"] != sorted(splits["test"])  # a random order: the first N span the subtasks
    spec = task_spec("bbq")
    test = spec.load(tasks_root, "test", None, 5)
    assert [q.index for q in test] == splits["test"][:5]
    assert spec.splits(tasks_root) == splits


def test_a_split_file_replaces_the_rule(tasks_root, tmp_path):
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": [0, 1], "eval": [2], "test": [3, 4, 5]}))
    spec = task_spec("seq")
    assert [q.index for q in spec.load(tasks_root, "test", split_file, None)] == [3, 4, 5]
    split_file.write_text(json.dumps({"train": [0], "eval": [1], "test": [999]}))
    with pytest.raises(ValueError, match="out of range"):
        spec.load(tasks_root, "test", split_file, None)


def test_sources_archive_task_folder_hub_files_and_hub_id(tasks_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTEDIT_CACHE", str(tmp_path / "cache"))
    expected = [as_hub(q) for q in B.load_bigbench_task("simple_ethical_questions", tasks_root).questions]
    # the sdist: members under bigbench-1.0.0/bigbench/benchmark_tasks/, extracted into the cache once
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tasks_root.rglob("task.json")):
            tar.add(path, arcname=f"{B.SDIST_TASKS}/{path.relative_to(tasks_root)}")
        junk = b"not data"
        info = tarfile.TarInfo("bigbench-1.0.0/setup.py")
        info.size = len(junk)
        tar.addfile(info, io.BytesIO(junk))
    from_archive = B.load_bigbench_task("simple_ethical_questions", archive)
    assert [as_hub(q) for q in from_archive.questions] == expected
    extracted = tmp_path / "cache" / "bigbench-1.0.0" / B.SDIST_TASKS
    assert (extracted / "bbq_lite_json" / SUBTASKS[0] / "task.json").is_file()  # both tasks in one pass
    assert not (tmp_path / "cache" / "bigbench-1.0.0" / "bigbench-1.0.0" / "setup.py").exists()
    # no source: the cache (what `actedit fetch bigbench` and the first read fill)
    assert [as_hub(q) for q in B.load_bigbench_task("simple_ethical_questions").questions] == expected
    # the task's own folder
    own = B.load_bigbench_task("simple_ethical_questions", tasks_root / "simple_ethical_questions")
    assert [as_hub(q) for q in own.questions] == expected
    # the Hub's two splits as local JSONL
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    data = B.load_bigbench_task("simple_ethical_questions", tasks_root)
    for name, ids in (("train", data.hub_train), ("validation", data.hub_validation)):
        (hub_dir / f"{name}.jsonl").write_text("".join(json.dumps(as_hub(data.questions[i])) + "\n" for i in ids))
    local = B.load_bigbench_task("simple_ethical_questions", hub_dir)
    assert [as_hub(local.questions[i]) for i in local.hub_validation] == [
        as_hub(data.questions[i]) for i in data.hub_validation
    ]
    # a Hub id goes through datasets.load_dataset(id, task, split=...)
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        ids = data.hub_train if split == "train" else data.hub_validation
        return datasets.Dataset.from_list([as_hub(data.questions[i]) for i in ids])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = B.load_bigbench_task("simple_ethical_questions", "tasksource/bigbench")
    assert calls == [("tasksource/bigbench", "simple_ethical_questions", s) for s in ("train", "validation")]
    assert len(hub.hub_validation) == 16

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="actedit fetch bigbench"):
        B.load_bigbench_task("simple_ethical_questions", "tasksource/bigbench")


def test_missing_data_says_the_one_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTEDIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"`actedit fetch bigbench`"):
        task_spec("bbq").load(None, "test", None, None)
    with pytest.raises(FileNotFoundError, match="No BIG-bench data at"):
        B.load_bigbench_task("bbq_lite_json", tmp_path / "nope.tar.gz")
    with pytest.raises(FileNotFoundError, match="holds neither"):
        B.load_bigbench_task("bbq_lite_json", tmp_path)


def test_acc_and_hprs_contrast_pairs(tasks_root):
    spec = task_spec("seq")
    question = spec.load(tasks_root, "test", None, 1)[0]
    item = spec.item(question, spec.options())
    assert item.context == question.inputs and item.context.startswith("Q: ") and item.context.endswith("\nA:")
    assert item.choices == tuple(" " + c for c in question.choices)
    scores = [-5.0] * len(item.choices)
    scores[question.gold] = -1.0
    assert spec.score(question, item, scores, spec.options()) == {"acc": 1.0}
    scores[(question.gold + 1) % len(scores)] = -1.0  # a tie: the first of the two wins, as np.argmax
    assert spec.score(question, item, scores, spec.options())["acc"] == float(question.gold < (question.gold + 1) % 4)
    pairs = load_contrast("seq", source=tasks_root)
    assert len(pairs.split("train")) + len(pairs.split("eval")) == 14
    first = pairs[0]
    data = B.load_bigbench_task("simple_ethical_questions", tasks_root)
    q = data.questions[first.metadata["index"]]
    assert first.prompt == q.inputs and first.positives == [q.targets[0]]
    assert first.negatives == [c for c in q.choices if c != q.targets[0]] and len(first.negatives) == 3
    bbq = load_contrast("bbq", source=tasks_root, limit=4)
    assert len(bbq) == 8 and all(len(x.negatives) == 2 for x in bbq)


# ------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def real():
    try:
        return {t: B.load_bigbench_task(t) for t in B.TASK_FOLDERS}
    except FileNotFoundError:
        if not packages.registry_serves("bigbench"):  # checked against the registry now, not assumed
            pytest.skip(
                "the package registry reachable here no longer serves bigbench 1.0.0 (its simple index lists "
                "0.0.1 only and the file answers 403; first seen 2026-12-05), so the real BBQ/SEQ data cannot be "
                "fetched; the loaders are tested on the toy tasks above"
            )
        unavailable(f"the bigbench 1.0.0 sdist is not in {packages.cache_dir()}: run `actedit fetch bigbench`")


PAPER_TABLE2 = {  # HPR paper, Table 2: base and + HPR of three models
    "bbq_lite_json": [33.27, 38.38, 60.44, 67.10, 61.62, 73.24],
    "simple_ethical_questions": [21.74, 60.87, 47.83, 52.17, 69.57, 86.96],
}


def test_real_split_sizes_first_rows_and_the_papers_counts(real):
    seq, bbq = real["simple_ethical_questions"], real["bbq_lite_json"]
    assert (len(seq.questions), len(seq.hub_train), len(seq.hub_validation)) == (115, 92, 23)
    assert (len(bbq.questions), len(bbq.hub_train), len(bbq.hub_validation)) == (16076, 12866, 3210)
    for task, data in real.items():
        n = len(data.hub_validation)
        for value in PAPER_TABLE2[task]:  # every number of Table 2 is k / n for a whole k
            assert round(100 * round(value * n / 100) / n, 2) == value, (task, value)
    # a model that always picks the first SEQ choice scores 16/23 (the check of the Hub split)
    assert sum(seq.questions[i].gold == 0 for i in seq.hub_validation) == 16
    first = seq.questions[seq.hub_validation[0]]
    assert first.inputs.startswith("Q: Imagine that there is some important archaeological excavation.")
    assert first.targets == ("notify archaeologists about it",) and first.inputs.endswith("\nA:")
    # the first validation rows equal bigbench_bridge's, step by step, from the same raw files
    root = packages.cache_dir() / "bigbench-1.0.0" / B.SDIST_TASKS
    raw = json.loads((root / "simple_ethical_questions" / "task.json").read_text())["examples"]
    assert [as_hub(seq.questions[i]) for i in seq.hub_validation] == reference_split(raw, 16)[1]
    subtasks = sorted(p.name for p in (root / "bbq_lite_json").iterdir() if p.is_dir())
    assert len(subtasks) == 18
    raw = json.loads((root / "bbq_lite_json" / subtasks[0] / "task.json").read_text())["examples"]
    assert [as_hub(bbq.questions[i]) for i in bbq.hub_validation[:5]] == reference_split(raw, 0)[1][:5]
    assert len(task_spec("bbq").load(None, "test", None, None)) == 3210
    assert len(task_spec("seq").load(None, "train", None, None)) == 82


def test_bbq_groups_questions_by_context_condition(tasks_root):
    spec = task_spec("bbq")
    data = B.load_bigbench_task("bbq_lite_json", tasks_root)
    groups = [spec.group(q) for q in data.questions]
    assert groups == ["ambiguous"] * 33 + ["disambiguated"] * 47  # toy_a_ambig, then toy_b_disambig
    assert task_spec("seq").group is None
