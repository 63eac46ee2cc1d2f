"""TruthfulQA's contrast data: the local MC file with HPR's split file, its targets and its errors."""

from __future__ import annotations

import json

import pytest

from actedit.data.truthfulqa import load_truthfulqa_mc
from conftest import SHARED_DATA


def test_truthfulqa_local_and_split():
    full = load_truthfulqa_mc(SHARED_DATA)
    assert len(full) == 817 and full.name == "truthfulqa_mc2"
    train = load_truthfulqa_mc(SHARED_DATA, split="train")  # HPR's split file found in the directory
    splits = json.loads((SHARED_DATA / "hpr_ids_splits.json").read_text())
    assert len(train) == len(splits["train"]) == 367
    assert [x.metadata["index"] for x in train[:5]] == splits["train"][:5]
    assert all(x.split == "train" for x in train)
    records = json.loads((SHARED_DATA / "mc_task.json").read_text())
    q = records[splits["train"][0]]
    ex = train[0]
    assert ex.prompt == q["question"]
    assert ex.positives == [c for c, y in q["mc2_targets"].items() if y]
    assert ex.negatives == [c for c, y in q["mc2_targets"].items() if not y]
    mc1 = load_truthfulqa_mc(SHARED_DATA, split="eval", targets="mc1", limit=3)
    assert len(mc1) == 3 and all(len(x.positives) == 1 for x in mc1)
    assert (
        load_truthfulqa_mc(SHARED_DATA, split="test", split_file=SHARED_DATA / "hpr_ids_splits.json")[0].split == "test"
    )


def test_truthfulqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mc_task.json"):
        load_truthfulqa_mc(tmp_path / "nowhere")
    (tmp_path / "mc_task.json").write_text(
        json.dumps([{"question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}])
    )
    with pytest.raises(ValueError, match="needs a split file"):
        load_truthfulqa_mc(tmp_path, split="train")
    assert len(load_truthfulqa_mc(tmp_path)) == 1
    (tmp_path / "mc_task.json").write_text(
        json.dumps([{"question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 1}}])
    )
    with pytest.raises(ValueError, match="no false choice"):
        load_truthfulqa_mc(tmp_path)
