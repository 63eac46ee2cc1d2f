"""The task registry: a task's names and aliases resolve to its one spec, unknown names are errors
that list the known ones, the names load_contrast reads without a file, a task's options, and
lm-eval's standard error of a mean against the textbook formula."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics

import pytest

from actedit.data import tasks
from actedit.data.tasks import (
    contrast_names,
    is_contrast_name,
    is_task,
    load_contrast,
    mean_stderr,
    task_names,
    task_spec,
)
from actedit.data.truthfulqa import TASK as TRUTHFULQA
from actedit.interventions.settings import UnknownSettingError
from conftest import SHARED_DATA


def test_a_task_answers_to_its_name_and_aliases_in_any_spelling():
    assert "truthfulqa" in task_names() and task_names() == sorted(set(task_names()))
    assert set(TRUTHFULQA.aliases) == {"truthfulqa_mc", "truthful_qa"}
    for name in ("truthfulqa", "TruthfulQA", " truthfulqa_mc ", "TruthfulQA-MC", "truthful-qa", "TRUTHFUL_QA"):
        assert task_spec(name) is TRUTHFULQA, name
        assert is_task(name), name
    for name in ("truthfulqa_mc3", "bbq_mc", "toxigen.jsonl", "", "truthful qa"):
        assert not is_task(name), name
    for name, aliases in (("bbq", {"bbq_lite_json", "bbq_lite"}), ("seq", {"simple_ethical_questions"})):
        assert set(task_spec(name).aliases) == aliases and task_spec(name.upper()).name == name
    assert task_spec("Simple-Ethical-Questions").name == "seq" and task_spec("toxigen").name == "toxigen"


def test_unknown_task_error_lists_the_known_tasks():
    message = f"unknown task 'truthfulqa_mc3'; known: {', '.join(task_names())}."
    with pytest.raises(ValueError, match=re.escape(message)):
        task_spec("truthfulqa_mc3")


def test_a_registered_task_is_found_listed_and_named_in_errors(monkeypatch):
    before = task_names()
    with monkeypatch.context() as patch:  # a private copy of the registry for this test
        patch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
        patch.setattr(tasks, "_ALIASES", dict(tasks._ALIASES))
        toy = dataclasses.replace(TRUTHFULQA, name="toy_mc", title="a toy task", aliases=("toy",))
        assert tasks.register_task(toy) is toy
        assert tasks.register_task(toy) is toy  # the same spec again is a no-op
        with pytest.raises(ValueError, match="a task named 'toy_mc' is already registered"):
            tasks.register_task(dataclasses.replace(toy, title="another toy task"))
        assert task_names() == sorted([*before, "toy_mc"])
        assert task_spec("Toy-MC") is toy and task_spec("TOY") is toy
        assert {"toy_mc", "toy"} <= set(contrast_names()) and is_contrast_name("Toy")
        with pytest.raises(ValueError, match=re.escape(f"known: {', '.join(sorted([*before, 'toy_mc']))}.")):
            task_spec("nope")
    assert task_names() == before and not is_task("toy_mc")


def test_contrast_names_are_the_tasks_and_aliases():
    aliases = {alias for name in task_names() for alias in task_spec(name).aliases}
    assert contrast_names() == sorted(set(task_names()) | aliases)
    for name in ("BBQ", "Simple-Ethical-Questions", "seq", "toxigen", "truthful_qa", "TruthfulQA"):
        assert is_contrast_name(name), name
    for name in ("data.jsonl", "toxigen.jsonl", "no-such-dataset", ""):
        assert not is_contrast_name(name), name


def test_load_contrast_reads_tasks_and_aliases_and_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_contrast("no-such-dataset")
    with pytest.raises(ValueError, match=re.escape(f"give a JSONL file or one of {', '.join(contrast_names())}.")):
        load_contrast("no-such-dataset")
    both = load_contrast("truthfulqa", source=SHARED_DATA)  # the task's training data: train + eval
    assert len(both.split("eval")) == 41 and len(both.split("train")) == 367
    assert len(load_contrast("truthfulqa_mc", source=SHARED_DATA, limit=2)) == 4  # an alias; 2 per split


def test_task_options_are_checked_by_name():
    assert TRUTHFULQA.options().mc2_rule == "split"
    assert TRUTHFULQA.options({"mc2_rule": "labels"}).mc2_rule == "labels"
    assert TRUTHFULQA.options(None, mc2_rule="labels").mc2_rule == "labels"
    with pytest.raises(UnknownSettingError, match=r"truthfulqa options\.mc2_rul \(did you mean 'mc2_rule'\?\)"):
        TRUTHFULQA.options({"mc2_rul": "labels"})
    with pytest.raises(ValueError, match="mc2_rule must be one of"):
        TRUTHFULQA.options({"mc2_rule": "majority"})


@pytest.mark.parametrize(
    "values", [[1.0, 0.0, 1.0, 1.0], [0.25, 0.5], [3, 3, 3], [random.Random(0).random() for _ in range(50)]]
)
def test_mean_stderr_is_the_sample_std_over_root_n(values):
    expected = statistics.stdev(values) / math.sqrt(len(values))
    assert mean_stderr(values) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_mean_stderr_of_fewer_than_two_values_is_nan():
    assert math.isnan(mean_stderr([])) and math.isnan(mean_stderr([0.7]))
