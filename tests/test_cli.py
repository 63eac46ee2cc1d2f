"""The ``actedit`` command line: artifact inspection and clear one-line errors."""

import json

import torch

import actedit.interventions as ai
from actedit.cli import main


def test_info_prints_artifact_metadata(llama, tmp_path, capsys):
    path = ai.save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "a")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "caa at block_output layers [1]" in out and "llama" in out
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edits"][0]["method"] == "caa"


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("actedit info: error: No artifact directory") and "Traceback" not in err


def test_removed_flags_get_their_new_spelling(capsys):
    for argv in (
        ["eval", "--model", "m", "--out", "o", "--mc2-rule", "labels"],
        ["eval", "--mc2-rule=labels"],  # also before the required flags are given
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            "actedit eval: error: --mc2-rule was removed; write --option mc2_rule=labels instead."
        )
