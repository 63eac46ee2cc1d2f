"""Artifacts: save -> stock ``pyvene.IntervenableModel.load`` in a fresh process reproduces the
logits and greedy generations bit for bit, per method and composed, on five model families; and
the documented errors for bad artifacts."""

import json

import pytest
import torch

import actedit.interventions as ai
from actedit.interventions import ArtifactError, load_artifact, push_to_hub, save_artifact
from actedit.interventions.edits import site_width
from conftest import FAMILIES, assert_stock_reload, reference_outputs, tiny_model
from conftest import STOCK_RELOAD_INPUTS as INPUTS


def randomise(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def method_configs(model):
    """One config per method (random but fixed fitted values) and a composed one."""
    g = torch.Generator().manual_seed(1)
    d = model.config.hidden_size
    heads = model.config.num_attention_heads
    head_dim = site_width(model, "attention_value_output") // heads
    mlp_width = site_width(model, "mlp_output")
    hpr = ai.build_hpr_config(model, [2])
    randomise(hpr.representations[0].intervention)
    q, _ = torch.linalg.qr(torch.randn(mlp_width, mlp_width, generator=g))
    sea = ai.build_sea_config(model, {1: (q[:, :4], q[:, 4:10])})
    iti = ai.build_iti_config(
        model,
        {
            0: {
                "directions": torch.nn.functional.normalize(torch.randn(heads, head_dim, generator=g), dim=-1),
                "sigmas": torch.rand(heads, generator=g) + 0.5,
                "heads": [0, heads - 1],
            }
        },
        alpha=5.0,
        position_policy="all",
    )
    caa = ai.build_caa_config(model, {1: torch.randn(d, generator=g)}, multiplier=3.0)
    actadd = ai.build_actadd_config(model, {1: torch.randn(3, d, generator=g) * 2})
    configs = {"hpr": hpr, "sea": sea, "iti": iti, "caa": caa, "actadd": actadd}
    fresh = dict(method_configs_fresh(model, configs))
    configs["composed"] = ai.compose(*fresh.values())
    return configs


def method_configs_fresh(model, configs):
    """Deep copies, so that the composed config owns its own intervention instances."""
    import copy

    return {k: copy.deepcopy(v) for k, v in configs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_stock_pyvene_load_in_fresh_process(family, tmp_path):
    model = tiny_model(family)
    with torch.no_grad():
        base_logits = model(**INPUTS).logits
    pvms = {name: ai.intervenable(model, config) for name, config in method_configs(model).items()}
    for name, pvm in pvms.items():
        assert not torch.allclose(reference_outputs(pvm)[0], base_logits), f"{name} edit changes nothing"
    assert_stock_reload(model, pvms, tmp_path)


def test_composed_same_site_order(llama):
    """CAA and HPR on the same site: CAA first, then HPR (METHOD_ORDER), whatever the argument order."""
    hpr = ai.build_hpr_config(llama, [1])
    randomise(hpr.representations[0].intervention)
    caa = ai.build_caa_config(llama, {1: torch.randn(32)}, multiplier=2.0)
    composed = ai.compose(hpr, caa)
    assert [r.intervention.method_name for r in composed.representations] == ["caa", "hpr"]
    seen = []
    handle = llama.model.layers[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        with torch.no_grad():
            llama(**INPUTS)
            ai.intervenable(llama, composed)(dict(INPUTS))
    finally:
        handle.remove()
    h = seen[0]
    caa_mod, hpr_mod = (r.intervention for r in composed.representations)
    with torch.no_grad():
        expected = hpr_mod.edit(caa_mod.edit(h, None), None)
    real = INPUTS["attention_mask"].bool()
    assert torch.allclose(seen[1][real], expected[real], atol=1e-5)
    meta = composed.actedit
    assert [e["method"] for e in meta["edits"]] == ["hpr", "caa"]


def test_config_metadata_and_model_card(llama, tmp_path):
    config = ai.build_caa_config(
        llama, {0: torch.randn(32), 2: torch.randn(32)}, multiplier=4.0, metadata={"data": {"name": "toy"}}
    )
    pvm = ai.intervenable(llama, config)
    path = save_artifact(pvm, tmp_path / "caa", metadata={"metrics": {"mc1": 0.5}})
    info = json.loads((path / "config.json").read_text())["actedit"]
    assert info["edits"][0]["method"] == "caa" and info["edits"][0]["layers"] == [0, 2]
    assert info["edits"][0]["hyperparameters"]["multiplier"] == 4.0
    assert info["base_model"]["model_type"] == "llama" and info["base_model"]["hidden_size"] == 32
    assert info["metrics"] == {"mc1": 0.5} and info["data"] == {"name": "toy"}
    assert info["actedit_version"]
    card = (path / "README.md").read_text()
    assert "caa" in card and "pv.IntervenableModel.load" in card and "0.5" in card
    manifest = json.loads((path / "actedit_manifest.json").read_text())["files"]
    assert set(manifest) == {p.name for p in path.iterdir()} - {"actedit_manifest.json"}


def _measurement(split="test", mc1=0.3, mc2=0.45, n=4, **extra):
    return {
        "task": "truthfulqa",
        "split": split,
        "n": n,
        "questions_sha256": f"q{n}",
        "scores": {"mc1": mc1, "mc2": mc2},
        "stderr": {"mc1": 0.05, "mc2": 0.04},
        "base": {"mc1": 0.25, "mc2": 0.40},
        "protocol": {"mc2_rule": "split"},
        "model": "tiny",
        "measured_by": "actedit eval",
        **extra,
    }


def test_recorded_scores_go_into_metadata_and_card_and_keep_the_edit(llama, tmp_path):
    import yaml

    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.randn(32)}, multiplier=2.0))
    selection = {"metric": "probe_accuracy", "k": 1, "scores": {"0": 0.6, "1": 0.9, "2": 0.7}, "selected": [1]}
    selection["ranking"] = [1, 2, 0]
    training = {"epochs": 3, "steps": 12, "best_epoch": 2, "metric": "loss", "best_score": 0.125, "history": []}
    path = save_artifact(pvm, tmp_path / "caa", metadata={"layer_selection": selection, "training": training})
    before = {p.name: p.read_bytes() for p in path.glob("intkey_*.bin")}
    identity = ai.edit_identity(path)
    card = (path / "README.md").read_text()
    stored = next(line for line in card.splitlines() if line.startswith("Stored numbers: "))
    assert "Not measured yet" in card and "model-index" not in card
    assert "| 1 | 0.9 | ✓ |" in card and "| 0 | 0.6 |  |" in card  # every layer's score, the chosen one marked
    assert "3 epochs, 12 steps, best epoch 2 by loss 0.125" in card

    assert ai.add_measurement(path, _measurement()) is True
    info = ai.artifact_metadata(path)
    assert [e["scores"] for e in info["metrics"]] == [{"mc1": 0.3, "mc2": 0.45}]
    card = (path / "README.md").read_text()
    assert "| truthfulqa | test | 4 | MC2 | 45.00 ± 4.00 | 40.00 | +5.00 | actedit eval |" in card
    front = yaml.safe_load(card.split("---")[1])
    result = front["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"mc1": 0.3, "mc2": 0.45}
    assert stored in card.splitlines()  # counted from the saved files as save_artifact counted the modules
    # the edit is the same: same files, same identity, loads and verifies
    assert {p.name: p.read_bytes() for p in path.glob("intkey_*.bin")} == before
    assert ai.edit_identity(path) == identity
    _, out = load_artifact(path, llama)(dict(INPUTS), unit_locations=None)
    _, ref = pvm(dict(INPUTS), unit_locations=None)
    assert torch.equal(out.logits, ref.logits)

    # the same measurement again changes nothing; new scores of it replace the old; another split adds one
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ai.add_measurement(path, _measurement()) is False and (path / "config.json").stat().st_mtime_ns == stamp
    ai.add_measurement(path, _measurement(mc2=0.5))
    ai.add_measurement(path, _measurement(split="eval", n=2))
    info = ai.artifact_metadata(path)
    assert [(e["split"], e["scores"]["mc2"]) for e in info["metrics"]] == [("test", 0.5), ("eval", 0.45)]
    assert ai.edit_identity(path) == identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caa"]  # no temporary directory left


def test_refitting_changes_the_identity_and_bad_measurements_are_refused(llama, tmp_path):
    path = save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "a")
    identity = ai.edit_identity(path)
    save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: 2 * torch.ones(32)})), tmp_path / "a")
    assert ai.edit_identity(path) != identity
    with pytest.raises(ValueError, match="missing: scores, stderr"):
        ai.add_measurement(path, {"task": "truthfulqa", "split": "test", "n": 3})
    with pytest.raises(ArtifactError, match="config.json"):
        ai.add_measurement(tmp_path, _measurement())


def test_an_interrupted_recording_leaves_the_artifact_as_it_was(llama, tmp_path, monkeypatch):
    from actedit.interventions import artifacts

    path = save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "a")
    files = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        ai.add_measurement(path, _measurement())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_metrics_of_an_earlier_release_are_kept_beside_new_ones(llama, tmp_path):
    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)}))
    path = save_artifact(pvm, tmp_path / "a", metadata={"metrics": {"mc1": 0.5}})
    ai.add_measurement(path, _measurement())
    assert ai.artifact_metadata(path)["metrics"][0] == {"mc1": 0.5}
    assert "| truthfulqa | test | 4 | MC1 | 30.00 ± 5.00 |" in (path / "README.md").read_text()


@pytest.fixture
def saved_hpr(llama, tmp_path):
    pvm = ai.intervenable(llama, ai.build_hpr_config(llama, [1]))
    return save_artifact(pvm, tmp_path / "hpr")


def test_wrong_family_or_size_is_refused(saved_hpr):
    with pytest.raises(ArtifactError, match="model_type"):
        load_artifact(saved_hpr, tiny_model("gpt2"))
    with pytest.raises(ArtifactError, match="hidden_size"):
        load_artifact(saved_hpr, tiny_model("llama", hidden_size=48, intermediate_size=64))


def test_stock_load_into_wrong_size_gives_clear_error(saved_hpr):
    import pyvene as pv

    bigger = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match="width 32"):
        pv.IntervenableModel.load(str(saved_hpr), bigger)


def test_missing_and_truncated_bin(saved_hpr, llama):
    binary = next(saved_hpr.glob("intkey_*.bin"))
    data = binary.read_bytes()
    binary.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(saved_hpr, llama)
    binary.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(saved_hpr, llama)


def test_a_changed_config_is_refused(saved_hpr, llama):
    config = saved_hpr / "config.json"
    data = json.loads(config.read_text())
    data["actedit"]["edits"][0]["hyperparameters"]["alpha"] = 9.0
    config.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="config.json does not match the SHA-256"):
        load_artifact(saved_hpr, llama)


def test_mistyped_local_path_does_not_go_to_the_hub(saved_hpr, llama):
    for typo in [str(saved_hpr) + "x", "./artifacts/hpr", "runs/a/b"]:
        with pytest.raises(FileNotFoundError, match="No artifact directory"):
            load_artifact(typo, llama)


def test_not_an_artifact(tmp_path, llama):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="config.json"):
        load_artifact(tmp_path / "empty", llama)


def test_interrupted_save_leaves_nothing_loadable(llama, tmp_path, monkeypatch):
    pvm = ai.intervenable(llama, ai.build_hpr_config(llama, [1]))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(pvm.config), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(pvm, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_resave_replaces_atomically(llama, tmp_path):
    first = save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {0: torch.ones(32)})), tmp_path / "a")
    save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "a")
    assert json.loads((first / "config.json").read_text())["actedit"]["edits"][0]["layers"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_state_dict_is_on_cpu_and_loads_with_cpu_mapping(saved_hpr, llama):
    pvm = load_artifact(saved_hpr, llama)
    for intervention in pvm.interventions.values():
        assert all(t.device.type == "cpu" for t in intervention.state_dict().values())


class FakeHubApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": "https://hub/commit/1"})()


def test_push_to_hub_uploads_the_directory(saved_hpr):
    api = FakeHubApi()
    url = push_to_hub(saved_hpr, "someone/hpr-edit", api=api)
    assert url == "https://hub/commit/1"
    assert api.calls[0] == (
        "create_repo",
        {"repo_id": "someone/hpr-edit", "repo_type": "model", "private": False, "exist_ok": True},
    )
    assert api.calls[1][1]["folder_path"] == str(saved_hpr)
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(saved_hpr, "no-owner", api=api)


def test_unknown_method_name():
    with pytest.raises(ValueError, match="unknown method 'rome'; known: actadd, caa, iti, sea, hpr"):
        ai.method_spec("rome")


def test_layer_out_of_range(llama):
    with pytest.raises(ValueError, match="out of range"):
        ai.build_caa_config(llama, {7: torch.zeros(32)})


@pytest.mark.parametrize(
    "cls", [ai.HPRIntervention, ai.SEAIntervention, ai.ITIIntervention, ai.CAAIntervention, ai.ActAddIntervention]
)
def test_constructible_by_pyvene_alone(cls, llama):
    """pyvene builds each class from a plain config with default hyperparameters."""
    import pyvene as pv

    config = pv.IntervenableConfig(
        representations=[{"layer": 1, "component": "block_output", "intervention_type": cls}]
    )
    pvm = pv.IntervenableModel(config, llama)
    intervention = pvm.interventions[pvm.sorted_keys[0]]
    assert isinstance(intervention, cls) and int(intervention.embed_dim) == 32
    _, out = pvm(dict(INPUTS))
    assert out.logits.shape == (2, 6, llama.config.vocab_size)


def test_nan_fitted_values_rejected():
    with pytest.raises(ValueError, match="NaN"):
        ai.CAAIntervention(embed_dim=4, vector=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        ai.ActAddIntervention(embed_dim=2, steering=torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        ai.ITIIntervention(embed_dim=4, num_heads=2, directions=torch.full((2, 2), float("nan")))
