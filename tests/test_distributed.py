"""Data parallelism under a launcher (:mod:`actedit.data.distributed`): 2 CPU processes with gloo,
started by ``torch.distributed.run`` (torchrun), give the store and the scores of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data_collect import dataset

from actedit.cli import main
from actedit.data import distributed as dd
from actedit.data.collect import ActivationStore, collect_activations
from actedit.data.tasks import task_spec
from actedit.eval.distributed import merge_results
from actedit.eval.mc import MCRecord, MCResult
from conftest import SHARED_DATA, make_tokenizer, require_truthfulqa, save_tiny_chat_model, tiny_model

TESTS = Path(__file__).resolve().parent
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COLLECT = dict(format="hpr", sites=["block_output", "mlp_output"], layers=[0, 2], shard_rows=30, batch_size=2)
"""Small shards (7 of them for ``dataset(7)``): both ranks write several, in turn."""


def launch(args, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on CPU (gloo), one torch thread per process."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        LAUNCH + [str(a) for a in args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ------------------------------------------------------------------------- one process
def test_one_process_is_a_world_of_one_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    w = dd.world()
    assert (w.rank, w.size, w.is_main, w.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    assert dd.shard_of(5) == range(5) and dd.owner_of(3) == 0 and dd.process_device() is None
    assert dd.gather_objects("x") == ["x"] and dd.all_gather_objects(1) == [1] and dd.broadcast_object(2) == 2
    assert dd.run_on_main(lambda a, b=0: a + b, 1, b=2) == 3
    dd.barrier()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dd.world() == dd.World()
    assert not torch.distributed.is_initialized()


def test_blocks_and_turns_cover_every_item_once_in_order():
    for n in (0, 1, 2, 5, 9):
        for size in (1, 2, 3, 4):
            blocks = [dd.shard_of(n, dd.World(rank=r, size=size)) for r in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [dd.owner_of(k, dd.World(rank=0, size=3)) for k in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="non-negative integer"):
        dd.shard_of(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        dd.owner_of(True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT are not set"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "outside 0..1"),
        ({"WORLD_SIZE": "0"}, "at least 1"),
    ],
)
def test_a_half_set_launch_environment_is_explained(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        dd.world()
    assert not torch.distributed.is_initialized()


def test_merged_blocks_give_the_metrics_of_all_questions():
    task = task_spec("truthfulqa")

    def result(values, prefix):
        records = [MCRecord(i, ["a", "b"], [-1.0, -2.0], {"mc1": v, "mc2": v / 2}) for i, v in values]
        protocol = {"n_questions": len(records), "shared_prefix_tokens": prefix, "mode": "packed", "tokens_fed": 50}
        return MCResult("truthfulqa", records, {}, {}, 1.0 + len(records), protocol)

    merged = merge_results([result([(4, 1.0), (7, 0.0)], 30), result([(9, 1.0)], 33)], task)
    assert [r.index for r in merged.records] == [4, 7, 9]
    assert merged.metrics == {"mc1": pytest.approx(2 / 3), "mc2": pytest.approx(1 / 3)}
    assert merged.stderr["mc1"] == pytest.approx(((1 / 3) / 3) ** 0.5)  # std(ddof=1) / sqrt(n)
    assert merged.protocol["n_questions"] == 3 and merged.protocol["shared_prefix_tokens"] == 30
    assert merged.protocol["tokens_fed"] == 100
    assert merged.protocol["processes"] == 2 and merged.seconds == 3.0
    with pytest.raises(ValueError, match="at least one"):
        merge_results([], task)


# ------------------------------------------------------------------------ two processes
COLLECT_WORKER = """
import sys
import torch
from conftest import make_tokenizer, tiny_model
from test_data_collect import dataset
from test_distributed import COLLECT
from actedit.data.collect import collect_activations
from actedit.data.distributed import world

out = sys.argv[1]
tok = make_tokenizer()
model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
w = world()
assert w.size == 2 and torch.distributed.is_initialized()
listed = []
for name in ("fresh", "resumed"):
    kwargs = dict(progress=False, on_shard=listed.append, **COLLECT)
    store = collect_activations(model, tok, dataset(7), f"{out}/{name}", **kwargs)
    assert store.complete
memory = collect_activations(model, tok, dataset(7), None, progress=False, **COLLECT)
tensors = {f"{s}.{l}": memory.load(s, l) for s in COLLECT["sites"] for l in COLLECT["layers"]}
torch.save({"tensors": tensors, "columns": memory.columns(), "manifest": memory.manifest}, f"{out}/memory-{w.rank}.pt")
with open(f"{out}/listed-{w.rank}.txt", "w") as f:
    f.write(",".join(e["file"] for e in listed))
"""


def _without_timing(manifest):
    shards = [{k: v for k, v in s.items() if k not in ("seconds", "tokens")} for s in manifest["shards"]]
    return {**{k: v for k, v in manifest.items() if k not in ("shards", "environment")}, "shards": shards}


def _assert_same_store(store: ActivationStore, reference: ActivationStore) -> None:
    assert _without_timing(store.manifest) == _without_timing(reference.manifest)
    assert store.examples == reference.examples
    for column, values in reference.columns().items():
        assert (store.columns()[column] == values).all(), column
    for site in COLLECT["sites"]:
        for layer in COLLECT["layers"]:
            assert torch.equal(store.load(site, layer), reference.load(site, layer)), (site, layer)


def test_two_processes_collect_the_store_of_one(tmp_path):
    tok = make_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    reference = collect_activations(model, tok, dataset(7), tmp_path / "one", progress=False, **COLLECT)
    assert len(reference.manifest["shards"]) >= 5

    class Stop(Exception):
        pass

    def stop(entry):
        raise Stop

    # an interrupted one-process store that the two processes resume
    with pytest.raises(Stop):
        collect_activations(
            model, tok, dataset(7), tmp_path / "two" / "resumed", progress=False, on_shard=stop, **COLLECT
        )
    (tmp_path / "worker.py").write_text(COLLECT_WORKER)
    launch([tmp_path / "worker.py", tmp_path / "two"], tmp_path)

    for name in ("fresh", "resumed"):
        store = ActivationStore(tmp_path / "two" / name)
        _assert_same_store(store, reference)
        files = sorted(p.name for p in (tmp_path / "two" / name).iterdir())
        assert files == sorted(["manifest.json"] + [s["file"] for s in reference.manifest["shards"]])
    # rank 0 reported every listed shard in order (both stores), rank 1 none
    names = [s["file"] for s in reference.manifest["shards"]]
    assert (tmp_path / "two" / "listed-0.txt").read_text().split(",") == names + names[1:]
    assert (tmp_path / "two" / "listed-1.txt").read_text() == ""
    # an in-memory store is gathered whole on both ranks
    for rank in (0, 1):
        held = torch.load(tmp_path / "two" / f"memory-{rank}.pt", weights_only=False)
        assert [s["examples"] for s in held["manifest"]["shards"]] == [
            s["examples"] for s in reference.manifest["shards"]
        ]
        for key, value in held["tensors"].items():
            site, layer = key.rsplit(".", 1)
            assert torch.equal(value, reference.load(site, int(layer))), key
        for column, values in reference.columns().items():
            assert (held["columns"][column] == values).all(), column


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    require_truthfulqa()
    import actedit.interventions as ai

    root = tmp_path_factory.mktemp("dist_model")
    model_dir = save_tiny_chat_model(root)
    model = tiny_model("llama", vocab_size=len(make_tokenizer()), max_position_embeddings=1024)
    caa = ai.build_caa_config(model, {1: torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.5})
    ai.save_artifact(ai.intervenable(model, caa), root / "caa")
    return model_dir, root / "caa"


def _assert_same_scores(two: dict, one: dict, tol: float = 1e-5) -> None:
    """Per-question records in the same order with the same choices, scores equal to float
    rounding (the processes group the questions differently), the same MC1 answers."""
    assert [r["index"] for r in two["per_question"]] == [r["index"] for r in one["per_question"]]
    for a, b in zip(two["per_question"], one["per_question"], strict=True):
        assert a["choices"] == b["choices"]
        assert a["scores"] == pytest.approx(b["scores"], rel=tol, abs=tol)
        assert a["values"]["mc1"] == b["values"]["mc1"]
        assert a["values"]["mc2"] == pytest.approx(b["values"]["mc2"], abs=tol)
    for metric, value in one["metrics"].items():
        assert two["metrics"][metric] == pytest.approx(value, abs=tol)


@pytest.mark.filterwarnings("ignore:.*may break the model")  # a tiny random model repeats itself
def test_two_processes_score_as_one_and_only_rank_0_writes(eval_model, tmp_path):
    model_dir, caa = eval_model
    argv = ["eval", "--model", model_dir, "--data", SHARED_DATA, "--limit", "5", "--intervention", caa]
    argv = [str(a) for a in argv]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    proc = launch(["-m", "actedit.cli"] + argv + ["--out", tmp_path / "two"], tmp_path)
    assert proc.stdout.count(" on 5 questions -> ") == 1  # rank 0 reports, rank 1 does not
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["n_questions"] == 5 and two["edited"]["protocol"]["processes"] == 2
    for block in ("base", "edited"):
        _assert_same_scores(two[block], one[block])
    assert two["flips"] == one["flips"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


STUDY = {
    "dtype": "float32",
    "data": {"name": "truthfulqa_mc", "limit": 3},
    "methods": {
        "hpr": {"train": {"epochs": 1, "progress": False}, "settings": {"top_layers": 2}},
        "sea": {"settings": {"layers": "1-2", "base_tokens": 4}},
        "caa": {"settings": {"layers": 1, "position_policy": "answer"}},
    },
    "compose": "all",
    "eval": {"limit": 5, "norm_texts": 4},
}


def test_two_processes_run_the_study_of_one(eval_model, tmp_path):
    import yaml

    model_dir, _ = eval_model
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), **STUDY}, sort_keys=False))
    argv = ["run", str(config), "--data", str(SHARED_DATA), "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    proc = launch(["-m", "actedit.cli"] + argv + ["--out", tmp_path / "two"], tmp_path)
    assert proc.stdout.count("done in") == 1
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert list(two["methods"]) == list(one["methods"]) == ["base", "hpr", "sea", "caa", "composed"]
    for name in ("hpr", "sea", "caa"):
        reference = ActivationStore(tmp_path / "one" / "activations" / name)
        store = ActivationStore(tmp_path / "two" / "activations" / name)
        assert _without_timing(store.manifest)["shards"] == _without_timing(reference.manifest)["shards"]
    bases = [json.loads((tmp_path / d / "activations" / "sea_bases.json").read_text()) for d in ("one", "two")]
    assert bases[0] == bases[1]
    for name in one["methods"]:
        result_one = json.loads((tmp_path / "one" / "eval" / f"{name}.json").read_text())["result"]
        result_two = json.loads((tmp_path / "two" / "eval" / f"{name}.json").read_text())["result"]
        _assert_same_scores(
            {**result_two, "per_question": result_two["records"]}, {**result_one, "per_question": result_one["records"]}
        )
    # the edits hold the same weights (fitted once, on rank 0, from the same stores)
    for name in ("hpr", "sea", "caa", "composed"):
        weights = [
            {
                k: v
                for k, v in json.loads((tmp_path / d / "artifacts" / name / "actedit_manifest.json").read_text())[
                    "files"
                ].items()
                if k.endswith(".bin")
            }
            for d in ("one", "two")
        ]
        assert weights[0] and weights[0] == weights[1]
    # a rerun under the launcher reuses every step (rank 0 decides, rank 0 alone prints)
    again = launch(["-m", "actedit.cli", "run", config, "--data", SHARED_DATA, "--out", tmp_path / "two"], tmp_path)
    assert again.stdout.count("(reused)") == 6 and again.stdout.count("done in") == 1
    assert json.loads((tmp_path / "two" / "results.json").read_text())["methods"] == two["methods"]
