"""The training loop on cached pairs (HPR; all layers at once and the per-layer reference), top-k
training, best-epoch restore, schedules, checkpoints and resume."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actedit.data.store import PairedActivations
from actedit.interventions import HPRIntervention, registry
from actedit.interventions.base import ActEditIntervention
from actedit.interventions.registry import (
    LossTerm,
    MethodSpec,
    TrainedMethodSettings,
    TrainingRecipe,
    register_method,
)
from actedit.train.select import probe_accuracy
from actedit.train.trainer import (
    CHECKPOINT_NAME,
    PairObjective,
    TrainSettings,
    epoch_permutation,
    lr_factor,
    new_interventions,
    train_interventions,
    train_top_layers,
)


def train_hpr(train, eval_data, *, config, layers=None, callbacks=(), **arguments):
    """Fresh HPR modules for ``layers`` (default: the data's), seeded by ``config.seed``, trained jointly."""
    modules = new_interventions("hpr", train.width, layers or train.layers, seed=config.seed, **arguments)
    return train_interventions(modules, train, eval_data, config, callbacks)


def train_hpr_top_layers(train, eval_data, *, k, config):
    modules = new_interventions("hpr", train.width, train.layers, seed=config.seed)
    return train_top_layers(modules, train, eval_data, k=k, config=config)


def separable_pairs(n, seed, layers=3, d=32, margin=2.0, noise=0.2):
    """Pairs (h⁺_i, h⁻_i) = (c_i + m·u_l + ε, c_i − m·u_l + ε') with c_i ⊥ u_l: separable
    through the origin along a random direction u_l per layer (the same u_l in every split)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in range(layers):
        u = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(100 + layer)), dim=0)
        c = torch.randn(n, d, generator=g)
        c = c - (c @ u)[:, None] * u
        pos[layer] = c + margin * u + noise * torch.randn(n, d, generator=g)
        neg[layer] = c - margin * u + noise * torch.randn(n, d, generator=g)
    return PairedActivations(pos, neg)


def fast(**overrides):
    base = dict(learning_rate=1e-2, progress=False)
    base.update(overrides)
    return TrainSettings(**base)


def weights(modules):
    return {(layer, name): p.detach().clone() for layer, m in modules.items() for name, p in m.named_parameters()}


# ------------------------------------------------------------------------------ HPR on pairs
def test_hpr_separates_and_edits_negatives_toward_positives():
    train, evald = separable_pairs(1024, 0), separable_pairs(256, 1)
    result = train_hpr(train, evald, config=fast())
    assert result.metric == "probe_accuracy" and len(result.history) == 5
    assert result.best_score >= 0.95
    accuracy = probe_accuracy(result.modules, evald)  # independent of the trainer's bookkeeping
    assert min(accuracy.values()) >= 0.95
    assert accuracy == pytest.approx(result.layer_scores)
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    for layer, module in result.modules.items():
        assert isinstance(module, HPRIntervention)
        hp, hn = evald.positive[layer], evald.negative[layer]
        with torch.no_grad():
            edited = module(hn[None])[0]
            untouched = module(hp[None])[0]
        before = F.cosine_similarity(hn, hp, dim=-1)
        after = F.cosine_similarity(edited, hp, dim=-1)
        assert float(after.mean()) > float(before.mean()) + 0.1
        assert float((after > before).double().mean()) > 0.9
        assert torch.allclose(edited.norm(dim=-1), hn.norm(dim=-1), rtol=1e-4)  # rotation keeps norms
        assert float((untouched == hp).all(-1).double().mean()) > 0.95  # positives are kept


def test_vectorised_equals_per_layer_loop():
    train, evald = separable_pairs(200, 2), separable_pairs(64, 3)
    runs = {vec: train_hpr(train, evald, config=fast(vectorize=vec, epochs=3, batch_size=16)) for vec in (True, False)}
    a, b = weights(runs[True].modules), weights(runs[False].modules)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    for ra, rb in zip(runs[True].history, runs[False].history, strict=True):
        assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-5)
        assert ra.layer_scores == rb.layer_scores
    assert runs[True].best_epoch == runs[False].best_epoch


def test_vectorised_training_equals_independent_reference():
    """Per-layer training written out with torch.optim directly (same init, batches, schedule)."""
    train = separable_pairs(96, 4, layers=2, d=16)
    config = fast(epochs=2, batch_size=16, select_best=False, max_grad_norm=None, dtype="float64")
    result = train_hpr(train, None, config=config)
    torch.manual_seed(config.seed)
    reference = {layer: HPRIntervention(embed_dim=16).double() for layer in (0, 1)}
    for layer, module in reference.items():  # input_norm="rms": s = the RMS of the training rows, one number
        rows = torch.cat([torch.as_tensor(train.positive[layer]), torch.as_tensor(train.negative[layer])]).double()
        module.input_scale.data.fill_(float(rows.square().mean().sqrt()))
    steps = math.ceil(96 / 16) * 2
    warmup = math.ceil(0.05 * steps)
    for layer, module in reference.items():
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.0)
        step = 0
        for epoch in range(2):
            order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(96))
            for s in range(6):
                idx = order[s * 16 : (s + 1) * 16]
                for group in opt.param_groups:  # linear warmup then linear decay
                    group["lr"] = 1e-2 * (step / warmup if step < warmup else (steps - step) / (steps - warmup))
                opt.zero_grad()
                module.loss(train.positive[layer][idx].double(), train.negative[layer][idx].double()).backward()
                opt.step()
                step += 1
    for layer in (0, 1):
        got = dict(result.modules[layer].named_parameters())
        for name, p in reference[layer].named_parameters():
            assert torch.allclose(got[name].double(), p, atol=1e-6), (layer, name)


def test_loss_is_the_sum_of_the_probe_and_angle_terms():
    torch.manual_seed(0)
    module = HPRIntervention(embed_dim=12)
    hp, hn = torch.randn(5, 12), torch.randn(5, 12)
    assert torch.allclose(module.loss(hp, hn), module.probe_loss(hp, hn) + module.angle_loss(hp, hn))
    module.probe_loss(hp, hn).backward()
    assert module.probe.weight.grad is not None
    assert all(p.grad is None for p in module.angle_net.parameters())  # disjoint parameters


def test_top_k_training_equals_joint_training_on_the_selected_layers():
    """Without clipping the two terms never interact, so probe-first training of 4 layers with
    angle nets trained on the top 2 gives exactly the joint run's weights on those 2 layers."""
    train, evald = (
        separable_pairs(160, 11, layers=4, d=16, margin=0.4, noise=1.0),
        separable_pairs(64, 12, layers=4, d=16, margin=0.4, noise=1.0),
    )
    config = fast(epochs=3, batch_size=16, max_grad_norm=None, dtype="float64")
    joint = train_hpr(train, evald, config=config)
    result, selection = train_hpr_top_layers(train, evald, k=2, config=config)
    assert sorted(result.modules) == sorted(selection.selected) and len(selection.selected) == 2
    assert result.best_epoch == joint.best_epoch
    assert result.layer_scores == pytest.approx(joint.layer_scores)
    expected = sorted(joint.layer_scores, key=lambda layer: -joint.layer_scores[layer])[:2]
    assert sorted(selection.selected) == sorted(expected)
    a, b = weights(result.modules), weights({layer: joint.modules[layer] for layer in result.modules})
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-10, rtol=0), key
    for module in result.modules.values():  # trainable again afterwards, the fixed input scale excepted
        assert all(p.requires_grad != (n in module.fixed_parameters) for n, p in module.named_parameters())
    # the angle nets of the other layers were never trained
    assert len(result.history) == 3 + joint.best_epoch


def test_top_k_training_checks_its_arguments():
    train, evald = separable_pairs(32, 13, layers=2, d=8), separable_pairs(16, 14, layers=2, d=8)
    with pytest.raises(ValueError, match="eval_data"):
        train_hpr_top_layers(train, None, k=1, config=fast(epochs=1))
    with pytest.raises(ValueError, match="k must be between 1 and"):
        train_hpr_top_layers(train, evald, k=3, config=fast(epochs=1))
    with pytest.raises(ValueError, match="best_by='mean'"):
        train_hpr_top_layers(train, evald, k=1, config=fast(epochs=1, best_by="layer"))
    with pytest.raises(ValueError, match="stop_after_epoch"):
        fast(epochs=2, stop_after_epoch=3)


def test_shared_bank_with_pair_index_equals_explicit_pairs():
    bank = separable_pairs(40, 5, layers=2, d=16)
    acts = {layer: torch.cat([bank.positive[layer], bank.negative[layer]]) for layer in (0, 1)}
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(0, 40, 60), 40 + rng.integers(0, 40, 60)], axis=1)
    indexed = PairedActivations(acts, acts, index=index)
    explicit = PairedActivations({k: acts[k][index[:, 0]] for k in acts}, {k: acts[k][index[:, 1]] for k in acts})
    a = train_hpr(indexed, None, config=fast(epochs=2))
    b = train_hpr(explicit, None, config=fast(epochs=2))
    wa, wb = weights(a.modules), weights(b.modules)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_best_epoch_weights_are_restored():
    train, evald = separable_pairs(128, 6), separable_pairs(64, 7)
    for best_by in ("mean", "layer"):
        # the loop trains the modules in place: snapshot them after every epoch
        torch.manual_seed(0)
        modules = {layer: HPRIntervention(embed_dim=32) for layer in range(3)}
        snapshots = {}
        config = fast(learning_rate=3e-2, epochs=4, best_by=best_by, vectorize=False)
        result = train_interventions(
            modules,
            train,
            evald,
            config,
            callbacks=[
                lambda r, snapshots=snapshots, modules=modules: snapshots.__setitem__(r.epoch, weights(modules))
            ],
        )
        scores = [r.score for r in result.history]
        final = weights(result.modules)
        if best_by == "mean":
            assert result.best_epoch == int(np.argmax(scores)) + 1 < 4  # ties keep the earlier epoch
            assert result.best_score == scores[result.best_epoch - 1]
            assert all(torch.equal(final[k], snapshots[result.best_epoch][k]) for k in final)
            assert not all(torch.equal(final[k], snapshots[4][k]) for k in final)
            expected = result.history[result.best_epoch - 1].layer_scores
        else:
            epochs = result.layer_best_epochs
            assert len(set(epochs.values())) > 1  # layers keep different epochs
            for (layer, name), value in final.items():
                assert torch.equal(value, snapshots[epochs[layer]][(layer, name)])
            expected = {layer: max(r.layer_scores[layer] for r in result.history) for layer in range(3)}
        assert probe_accuracy(result.modules, evald) == pytest.approx(expected)
        assert result.layer_scores == pytest.approx(expected)
        # the vectorised run restores the same weights
        vec = train_hpr(train, evald, config=fast(learning_rate=3e-2, epochs=4, best_by=best_by))
        assert vec.best_epoch == result.best_epoch and vec.layer_best_epochs == result.layer_best_epochs
        for key, value in weights(vec.modules).items():
            assert torch.allclose(value, final[key], atol=1e-5, rtol=0)


def test_without_eval_data_the_last_epoch_is_kept():
    train = separable_pairs(64, 8, layers=1, d=16)
    result = train_hpr(train, None, config=fast(epochs=2))
    assert result.best_epoch is None and result.history[-1].score is None
    assert result.steps == 2 * 4
    summary = result.summary()
    assert summary["epochs"] == 2 and summary["config"]["learning_rate"] == 1e-2


def test_modules_that_cannot_be_stacked_train_in_a_loop():
    train = separable_pairs(48, 9, layers=2, d=16)
    torch.manual_seed(0)
    modules = {0: HPRIntervention(embed_dim=16), 1: HPRIntervention(embed_dim=16, angle_hidden_widths=(4,))}
    with pytest.warns(UserWarning, match="loop over layers"):
        result = train_interventions(modules, train, None, fast(epochs=1))
    assert result.modules[1].angle_widths.tolist() == [4]


# --------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_matches_transformers(schedule):
    import transformers

    total, warmup = 37, math.ceil(0.05 * 37)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
    }[schedule]
    sched = make(opt, warmup, total)
    for step in range(total):
        assert lr_factor(step, total, warmup, schedule) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_permutation(50, 3, 1)
    assert torch.equal(a, epoch_permutation(50, 3, 1))
    assert not torch.equal(a, epoch_permutation(50, 3, 2))
    assert sorted(a.tolist()) == list(range(50))


# ---------------------------------------------------------------------------- checkpoint/resume
class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    train, evald = separable_pairs(96, 10, layers=2, d=16), separable_pairs(32, 11, layers=2, d=16)
    full = train_hpr(train, evald, config=fast(epochs=4, checkpoint_dir=str(tmp_path / "full")))

    def stop_after_two(record):
        if record.epoch == 2:
            raise Interrupt

    config = fast(epochs=4, checkpoint_dir=str(tmp_path / "cut"))
    with pytest.raises(Interrupt):
        train_hpr(train, evald, config=config, callbacks=[stop_after_two])
    assert (tmp_path / "cut" / CHECKPOINT_NAME).is_file()
    resumed = train_hpr(train, evald, config=config)
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 4
    wa, wb = weights(full.modules), weights(resumed.modules)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r.score for r in full.history] == [r.score for r in resumed.history]
    assert resumed.best_epoch == full.best_epoch and resumed.steps == full.steps
    assert not [p for p in os.listdir(tmp_path / "cut") if p.endswith(".partial")]
    # a finished run resumes to its result without training again
    again = train_hpr(train, evald, config=config)
    assert again.resumed_from_epoch == 4 and all(torch.equal(wa[k], v) for k, v in weights(again.modules).items())


def test_resume_refuses_a_checkpoint_of_another_training(tmp_path):
    train = separable_pairs(32, 12, layers=1, d=16)
    train_hpr(train, None, config=fast(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="different training"):
        train_hpr(train, None, config=fast(epochs=1, learning_rate=3e-3, checkpoint_dir=str(tmp_path)))
    # resume=False starts over in the same directory
    train_hpr(train, None, config=fast(epochs=1, learning_rate=3e-3, checkpoint_dir=str(tmp_path), resume=False))


# ------------------------------------------------------------------------------------ validation
def test_bad_configs_and_data_raise():
    for kwargs, match in [
        ({"learning_rate": 0}, "learning_rate"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"schedule": "step"}, "schedule"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"best_by": "median"}, "best_by"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainSettings(**kwargs)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="NaN"):
        PairedActivations({0: x}, {0: torch.full((8, 4), float("nan"))})
    with pytest.raises(ValueError, match="every layer needs both"):
        PairedActivations({0: x}, {1: x})
    with pytest.raises(ValueError, match="rows must be paired"):
        PairedActivations({0: x}, {0: x[:5]})
    with pytest.raises(ValueError, match="width"):
        PairedActivations({0: x, 1: torch.randn(8, 5)}, {0: x, 1: torch.randn(8, 5)})
    with pytest.raises(ValueError, match="outside"):
        PairedActivations({0: x}, {0: x}, index=[[0, 8]])
    with pytest.raises(ValueError, match="empty"):
        PairedActivations({0: x[:0]}, {0: x[:0]})
    data = PairedActivations({0: x}, {0: x})
    with pytest.raises(ValueError, match="no layers"):
        train_hpr(data, None, layers=[3], config=fast())
    with pytest.raises(ValueError, match="width"):
        train_interventions({0: HPRIntervention(embed_dim=8)}, data, None, fast())
    with pytest.raises(ValueError, match="TrainableIntervention"):
        train_interventions({0: nn.Linear(4, 4)}, data, None, fast())


def test_progress_bar_runs(capsys):
    train, evald = separable_pairs(32, 13, layers=1, d=16), separable_pairs(16, 14, layers=1, d=16)
    train_hpr(train, evald, config=TrainSettings(epochs=1, progress=True))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "acc=" in err


def test_stacked_losses_are_used_only_where_the_class_defines_them():
    """HPR's hand-batched losses are the fast path; a subclass that overrides ``loss`` alone trains
    with its own loss in the per-layer loop, not with the inherited stacked one."""

    class DoubledLoss(HPRIntervention):
        def loss(self, h_pos, h_neg, reduction="mean"):
            return 2 * super().loss(h_pos, h_neg, reduction)

    train = separable_pairs(64, 6, layers=2, d=16)
    config = fast(epochs=1, select_best=False)
    task = PairObjective(new_interventions("hpr", 16, [0, 1]), train, None, config, loss_method="loss")
    assert task.vectorized
    torch.manual_seed(0)
    doubled = {layer: DoubledLoss(embed_dim=16) for layer in (0, 1)}
    with pytest.warns(UserWarning, match="has no stacked_loss: training loops over its 2 layers"):
        other = PairObjective(doubled, train, None, config, loss_method="loss")
    assert not other.vectorized
    # its declared terms (probe_loss, angle_loss) it did not override: their stacked versions are used
    assert PairObjective(doubled, train, None, config).vectorized
    idx = torch.arange(16)
    hp, hn = train.gather([0, 1], idx)
    loss, _ = other.loss(idx)
    assert torch.allclose(loss, sum(doubled[layer].loss(hp[i], hn[i]) for i, layer in enumerate((0, 1))))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_one_non_finite_entry_is_found_in_a_shared_bank(bad, as_numpy):
    bank = torch.randn(50, 6)
    bank[37, 2] = bad
    banks = {0: torch.randn(50, 6), 1: bank.numpy() if as_numpy else bank}
    with pytest.raises(ValueError, match=r"positive\[1\] contains NaN or inf"):
        PairedActivations(banks, banks, index=[[0, 1], [2, 3]])


def test_finite_values_whose_sum_overflows_are_accepted():
    big = torch.full((4, 3), 1e308, dtype=torch.float64)  # the sum overflows, every entry is finite
    pairs = PairedActivations({0: big}, {0: -big})
    assert pairs.num_pairs == 4


@pytest.mark.parametrize(
    "policy, cpu_threads, expected", [("PASSIVE", None, 1), ("", None, "torch"), ("PASSIVE", 2, 2)]
)
def test_training_threads_follow_the_openmp_wait_policy(monkeypatch, policy, cpu_threads, expected):
    """Under OMP_WAIT_POLICY=PASSIVE cached-activation training runs on one thread unless told
    otherwise; the caller's thread count is restored afterwards."""
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    train = separable_pairs(32, 7, layers=2, d=16)
    seen = []
    before = torch.get_num_threads()
    train_hpr(
        train,
        None,
        config=fast(epochs=1, cpu_threads=cpu_threads, select_best=False),
        callbacks=[lambda record: seen.append(torch.get_num_threads())],
    )
    assert seen == [before if expected == "torch" else expected]
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------- HPR at a large activation scale
def large_scale_pairs(n, seed, d=32):
    """Pairs shaped like Gemma-3's residual stream: three massive dimensions (about 2·10⁴, shared by
    every token), the rest about 300, the label ±400 along one small dimension, so that a negative
    and its positive are a few hundredths of a radian apart."""
    g = torch.Generator().manual_seed(seed)
    common = torch.zeros(d)
    common[:3] = torch.tensor([2.5e4, -1.8e4, 1.2e4])

    def tokens():
        h = common + 300 * torch.randn(n, d, generator=g)
        h[:, :3] += 2e3 * torch.randn(n, 3, generator=g)
        return h

    signal = torch.zeros(d)
    signal[5] = 400.0
    return PairedActivations({0: tokens() + signal}, {0: tokens() - signal})


@pytest.mark.parametrize("input_norm", ["rms", "per_dimension", "none"])
def test_hpr_learns_at_a_large_activation_scale_only_with_its_input_scale(input_norm):
    """The released recipe (AdamW 5e-4 on raw h) gives angle-net logits far below zero on such
    activations: θ̂ ≈ 0, a no-op edit. On h̃ = h ⊘ s (s the RMS, one number or per dimension), the
    probe separates and θ̂ follows the target angles."""
    train, evald = large_scale_pairs(4096, 0), large_scale_pairs(256, 1)
    modules = new_interventions("hpr", 32, [0], seed=0, input_norm=input_norm)
    result, _ = train_top_layers(modules, train, evald, k=1, config=TrainSettings(epochs=15, progress=False))
    module = result.modules[0]
    hp, hn = evald.positive[0], evald.negative[0]
    with torch.no_grad():
        accuracy = float(
            ((module.probe_logits(hp) > 0).float().mean() + (module.probe_logits(hn) <= 0).float().mean()) / 2
        )
        target = float(torch.arccos(F.cosine_similarity(hn, hp, dim=-1)).mean())
        predicted = float(module.raw_angle(hn).mean())
    assert 0.05 < target < 0.3
    if input_norm != "none":
        assert accuracy > 0.8  # the Bayes rate is Φ(400/300) = 0.91
        assert 0.5 * target < predicted < 1.5 * target
        scale = module.input_scale.detach()
        square = torch.cat([train.positive[0], train.negative[0]]).double().square()
        rms = square.mean().expand(32) if input_norm == "rms" else square.mean(0)
        assert torch.allclose(scale, rms.sqrt().float(), rtol=0.05)  # from a sample
    else:
        assert predicted < 1e-3  # the failure the input scale fixes
        assert torch.equal(module.input_scale.detach(), torch.ones(32))


# ----------------------------------------------------------------------------- the contract
class ToyThreeTerms(ActEditIntervention):
    """A trained method shaped nothing like HPR: three loss terms, no probe, layers by eval loss.
    h′ = h + a + (b·h) c; term 1 fits the shift a (the selecting term), term 2 the gate b, term 3
    the direction c."""

    method_name = "toy3"
    training_recipe = TrainingRecipe(
        terms=(LossTerm("shift_loss", trains="a"), LossTerm("gate_loss", trains="b"), LossTerm("dir_loss", trains="c")),
        selection="eval_loss",
    )

    def __init__(self, embed_dim=None, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        self.a = nn.Parameter(torch.zeros(self.d))
        self.b = nn.Parameter(torch.randn(self.d) * 0.1)
        self.c = nn.Parameter(torch.randn(self.d) * 0.1)

    def edit(self, h, mask=None):
        return h + self.a + (h @ self.b).unsqueeze(-1) * self.c

    def shift_loss(self, h_pos, h_neg):
        return (h_neg + self.a - h_pos).square().mean()

    def gate_loss(self, h_pos, h_neg):
        return (h_neg @ self.b - 1.0).square().mean()

    def dir_loss(self, h_pos, h_neg):
        return (self.edit(h_neg) - h_pos).square().mean()


@pytest.fixture
def toy_method():
    spec = MethodSpec(
        name="toy3",
        title="toy",
        intervention=ToyThreeTerms,
        settings_class=TrainedMethodSettings,
        site="block_output",
        order=9,
        format="hpr",
        reads="paired",
        splits=("train", "eval"),
        trained=True,
    )
    register_method(spec)
    yield spec
    registry._REGISTRY.pop("toy3", None)


def test_a_trained_method_of_three_terms_selected_by_eval_loss_trains_checkpoints_and_resumes(tmp_path, toy_method):
    train, evald = separable_pairs(64, 20, layers=3, d=8), separable_pairs(32, 21, layers=3, d=8)

    def run(directory, callbacks=()):
        modules = new_interventions("toy3", 8, [0, 1, 2], seed=5)
        config = fast(epochs=3, vectorize=False, checkpoint_dir=str(directory))
        return train_top_layers(modules, train, evald, k=2, config=config, callbacks=callbacks)

    full, selection = run(tmp_path / "full")
    assert selection.metric == "eval_loss" and len(selection.selected) == 2
    assert sorted(os.listdir(tmp_path / "full")) == ["dir_loss", "gate_loss", "shift_loss"]
    assert len(full.history) == 3 + 2 * full.best_epoch  # the selecting term, then two terms up to E*
    assert full.metric == "neg_eval_loss" and all(r.train_accuracy is None for r in full.history)
    # the eval losses the selection ranked are the shift term's own (a is frozen after it)
    assert sorted(full.modules) == selection.selected
    for layer, module in full.modules.items():
        expected = module.shift_loss(evald.positive[layer], evald.negative[layer]).item()
        assert selection.scores[layer] == pytest.approx(expected, rel=1e-5)
    calls = []

    def stop_in_the_second_term(record):
        calls.append(record)
        if len(calls) == full.best_epoch + 1:  # the gate term's first epoch
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", [stop_in_the_second_term])
    resumed, again = run(tmp_path / "cut")
    assert again.selected == selection.selected
    wa, wb = weights(full.modules), weights(resumed.modules)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_contract_is_checked_when_a_method_registers():
    class NoProbe(ToyThreeTerms):
        training_recipe = TrainingRecipe(terms=(LossTerm("shift_loss", trains="a"),), selection="probe_accuracy")

    base = dict(
        name="toy3", title="t", settings_class=TrainedMethodSettings, site="block_output", order=9, format="hpr"
    )
    with pytest.raises(ValueError, match="has no probe_logits"):
        MethodSpec(intervention=NoProbe, reads="paired", splits=("train", "eval"), trained=True, **base)
    with pytest.raises(ValueError, match="reads only the views paired"):
        MethodSpec(intervention=ToyThreeTerms, reads="labeled", splits=("train", "eval"), trained=True, **base)
    with pytest.raises(ValueError, match="splits must include 'eval'"):
        MethodSpec(intervention=ToyThreeTerms, reads="paired", splits=("train",), trained=True, **base)

    class Missing(ToyThreeTerms):
        training_recipe = TrainingRecipe(terms=(LossTerm("nope_loss", trains="a"),), selection="eval_loss")

    with pytest.raises(ValueError, match="has no nope_loss"):
        MethodSpec(intervention=Missing, reads="paired", splits=("train", "eval"), trained=True, **base)
    with pytest.raises(ValueError, match="selection must be one of"):
        TrainingRecipe(terms=(LossTerm("a", trains="a"),), selection="vibes")


def test_a_loop_over_layers_is_announced_when_the_class_has_no_stacked_loss():
    train = separable_pairs(16, 0, layers=2, d=8)
    modules = {layer: ToyThreeTerms(embed_dim=8) for layer in (0, 1)}
    with pytest.warns(UserWarning, match="has no stacked_shift_loss"):
        PairObjective(modules, train, None, fast(), loss_method="shift_loss")
