"""Base completions (SEA's H): the model's own greedy answers, cached per model and data."""

from __future__ import annotations

import pytest
from test_data_collect import model_for

from actedit.data.contrast import ContrastDataset, ContrastExample
from actedit.data.formats import ITIFormat, SEAFormat
from actedit.data.generate import GenerationSettings, generate_bases, generate_texts
from conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_generate_bases_are_the_models_greedy_answers_and_are_cached(tmp_path, tok):
    model = model_for("llama", tok)
    ds = ContrastDataset([ContrastExample(f"question {i}", [f"yes {i}"], [f"no {i}"], {"id": i}) for i in range(3)])
    fmt = SEAFormat()
    cache = tmp_path / "bases.json"
    based = generate_bases(model, tok, ds, fmt, max_new_tokens=5, cache_path=cache, progress=False)
    expected = generate_texts(
        model,
        tok,
        [fmt.template.format(prompt=ex.prompt) for ex in ds],
        GenerationSettings(max_new_tokens=5, use_chat_template=False),
    )
    for ex, answer in zip(based, expected, strict=True):
        assert len(ex.bases) == 1 and ex.bases[0] == (answer.split("\n", 1)[0].strip() or answer.strip() or ".")
        assert ex.positives and ex.negatives
    assert cache.is_file()
    saved = cache.read_text()
    again = generate_bases(
        model_for("llama", tok, seed=1), tok, ds, fmt, max_new_tokens=5, cache_path=cache, progress=False
    )  # other weights: the cache does not apply
    assert cache.read_text() != saved or [e.bases for e in again] == [e.bases for e in based]
    reused = generate_bases(
        model_for("llama", tok, seed=1), tok, ds, fmt, max_new_tokens=5, cache_path=cache, progress=False
    )
    assert [e.bases for e in reused] == [e.bases for e in again]
    with pytest.raises(ValueError, match="SEA's format"):
        generate_bases(model, tok, ds, ITIFormat())
