"""End-to-end LM-loss training of a pyvene model's interventions (:mod:`actedit.train.lm`)."""

import pytest
import torch
from torch import nn

from actedit.interventions import ActEditIntervention, build_hpr_config, edit_config, intervenable
from actedit.train.lm import evaluate_lm, lm_examples, train_lm, trainable_parameters
from actedit.train.trainer import TrainSettings
from conftest import tiny_model


class Interrupt(Exception):
    pass


def fast(**overrides):
    return TrainSettings(**{"learning_rate": 1e-2, "progress": False, **overrides})


def lm_data(n, seed, prompt_len=6, completion_len=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 97, (prompt_len + i % 3,), generator=g).tolist() for i in range(n)]
    # a learnable rule: the completion repeats a fixed token pattern
    completions = [[7, 8, 9, 10, 11][:completion_len] for _ in range(n)]
    return lm_examples(prompts, completions, pad_token_id=0)


def test_lm_examples_mask_labels_to_completions():
    data = lm_examples([[5, 6, 7], [5]], [[8, 9], [10, 11, 12]], pad_token_id=0)
    assert data["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert data["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert data["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 10, 11, 12, -100]]
    with pytest.raises(ValueError, match="empty completion"):
        lm_examples([[1]], [[]], pad_token_id=0)


def test_end_to_end_lm_training_of_hpr_reduces_the_loss():
    model = tiny_model("llama")
    torch.manual_seed(0)
    pvm = intervenable(model, build_hpr_config(model, [0, 1, 2]))
    train, evald = lm_data(32, 0), lm_data(16, 1)
    before = evaluate_lm(pvm, evald)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_lm(pvm, train, evald, fast(epochs=5, batch_size=8, learning_rate=2e-2))
    after = evaluate_lm(pvm, evald)
    assert result.metric == "neg_eval_loss" and result.modules is None
    assert after < before - 0.1
    assert result.best_score == pytest.approx(-after, rel=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # the base model stays frozen


class LearnedShift(ActEditIntervention):
    """A new trainable intervention (a learned additive vector), defined only in this test."""

    method_name = "caa"

    def __init__(self, embed_dim=None, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        self.shift = nn.Parameter(torch.zeros(self.d))

    def edit(self, h, mask):
        return h + self.shift.to(h.dtype)


def test_new_trainable_intervention_plugs_in_and_linked_parameters_count_once():
    model = tiny_model("llama")
    shared = LearnedShift(embed_dim=32)
    config = edit_config(model, "caa", {0: shared, 2: shared, 1: LearnedShift(embed_dim=32)}, component="block_output")
    pvm = intervenable(model, config)
    listed = pvm.get_trainable_parameters()
    named = trainable_parameters(pvm)
    assert len(listed) == 3 and len(named) == 2  # pyvene repeats the linked one
    assert len({id(p) for _, p in named}) == 2
    train = lm_data(24, 2)
    before = evaluate_lm(pvm, train)
    result = train_lm(pvm, train, None, fast(epochs=3, batch_size=8, learning_rate=5e-2))
    assert evaluate_lm(pvm, train) < before - 0.1
    assert float(shared.shift.detach().abs().sum()) > 0
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_lm_resume_after_interruption(tmp_path):
    def run(directory, callbacks=()):
        model = tiny_model("llama")
        torch.manual_seed(0)
        pvm = intervenable(model, build_hpr_config(model, [1], angle_hidden_widths=(8,)))
        cfg = fast(epochs=3, batch_size=8, checkpoint_dir=str(directory))
        train_lm(pvm, lm_data(16, 3), lm_data(8, 4), cfg, callbacks)
        return {n: p.detach().clone() for n, p in trainable_parameters(pvm)}

    full = run(tmp_path / "full")

    def stop(record):
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", [stop])
    resumed = run(tmp_path / "cut")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_bad_lm_training_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="best_by='layer'"):
        train_lm(intervenable(model, build_hpr_config(model, [0])), lm_data(4, 0), None, fast(best_by="layer"))
    with pytest.raises(ValueError, match="no completion tokens"):
        bad = lm_data(4, 0)
        bad["labels"][:] = -100
        train_lm(intervenable(model, build_hpr_config(model, [0])), bad, None, fast())
