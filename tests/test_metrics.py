"""Metric functions against values computed by hand, and the model-side helpers."""

from __future__ import annotations

import math
import unicodedata

import pytest
import torch
from conftest import MODEL_TYPES, CharTokenizer, build_tiny

from neuronpatch.arch import cache_kwarg
from neuronpatch.metrics import (
    agreement,
    argmax_at_answers,
    mean_ci,
    ngram_entropy,
    predict_answer,
    predict_answers,
    sample_text,
    token_accuracy,
    word_tokens,
)
from neuronpatch.tokens import teacher_forced

# --- token accuracy and locality agreement ---------------------------------------------


def test_token_accuracy_counts_matching_positions():
    assert token_accuracy([5, 6, 7], [5, 9, 7]) == pytest.approx(2 / 3)
    assert token_accuracy([1], [1]) == 1.0
    assert token_accuracy(torch.tensor([4, 4]), torch.tensor([3, 3])) == 0.0


def test_token_accuracy_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="2 predictions for 3"):
        token_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no answer tokens"):
        token_accuracy([], [])


def test_agreement_is_fraction_of_unchanged_argmax():
    # correctness does not enter: only whether each position kept its pre-edit argmax
    assert agreement([7, 8, 9, 10], [7, 0, 9, 0]) == 0.5
    assert agreement([3, 3, 3], [3, 3, 3]) == 1.0


# --- n-gram entropy --------------------------------------------------------------------


def _h(*probs):
    return -sum(p * math.log2(p) for p in probs)


def test_ngram_entropy_by_hand():
    # a b a b: bigrams ab ab ba -> H(2/3, 1/3); trigrams aba bab -> H(1/2, 1/2) = 1
    expected = (2 / 3 * _h(2 / 3, 1 / 3) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert expected == pytest.approx(0.972765, abs=1e-6)
    # the cat sat: two distinct bigrams (1 bit), one trigram (0 bits)
    assert ngram_entropy("the cat sat") == pytest.approx(1 / 3)
    # too short for any bigram or trigram
    assert ngram_entropy("hello") == 0.0
    assert ngram_entropy("") == 0.0


def test_ngram_entropy_splits_sentence_periods_like_word_tokenize():
    # Paris . Paris . Paris . -> bigrams (P,.)x3 (.,P)x2; trigrams (P,.,P)x2 (.,P,.)x2
    assert word_tokens("Paris. Paris. Paris.") == ["Paris", ".", "Paris", ".", "Paris", "."]
    expected = (2 / 3 * _h(3 / 5, 2 / 5) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("Paris. Paris. Paris.") == pytest.approx(expected)


def test_word_tokens_follow_treebank_rules():
    assert word_tokens("He didn't go, did he?") == [
        "He",
        "did",
        "n't",
        "go",
        ",",
        "did",
        "he",
        "?",
    ]


def test_ngram_entropy_repetition_scores_low():
    varied = "The cat sat on the mat while the dog slept by the door of the old house."
    repeated = "geohasher " * 15
    assert ngram_entropy(repeated) == 0.0
    assert ngram_entropy(varied) > 3.0


# --- confidence intervals --------------------------------------------------------------


def test_mean_ci_by_hand():
    mean, low, high = mean_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    half = 4.3027 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-4)
    assert mean_ci([4.0, 4.0, 4.0, 4.0]) == (4.0, 4.0, 4.0)


def test_mean_ci_undefined_below_two_values():
    assert mean_ci([5.0])[0] == 5.0
    assert all(math.isnan(v) for v in mean_ci([5.0])[1:])
    assert all(math.isnan(v) for v in mean_ci([]))


@pytest.mark.parametrize("n, t", [(31, 2.0423), (41, 2.0211), (61, 2.0003), (121, 1.9799)])
def test_mean_ci_large_n_uses_t_quantile(n, t):
    values = [0.0, 1.0] * (n // 2) + [0.5] * (n % 2)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    _, low, high = mean_ci(values)
    assert (high - low) / 2 == pytest.approx(t * sd / math.sqrt(n), rel=2e-4)


# --- model-side helpers ----------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3_text", "gpt_neox"])
def test_batched_argmax_equals_one_by_one(model_type):
    """Right padding leaves every real position's logits as without it."""
    model = build_tiny(model_type)
    tok = CharTokenizer()
    pairs = [("The capital of France is", "Paris"), ("Hi", "there you"), ("abc def", "g")]
    sequences = [teacher_forced(tok, p, a) for p, a in pairs]
    batched = argmax_at_answers(model, sequences, batch_size=8)
    with torch.no_grad():
        single = [
            model(input_ids=tf.input_ids).logits[0, tf.answer_positions].argmax(-1).tolist()
            for tf in sequences
        ]
    assert batched == single
    assert [len(ids) for ids in batched] == [len(tf.answer_ids) for tf in sequences]
    assert predict_answers(model, tok, pairs, batch_size=2) == single
    assert predict_answer(model, tok, *pairs[1]) == single[1]


def test_sample_text_is_seeded_and_counts_the_prompt():
    model, tok = build_tiny("llama"), CharTokenizer()
    text = sample_text(model, tok, "ab", seed=3, max_length=12)
    assert text == sample_text(model, tok, "ab", seed=3, max_length=12)
    assert len(text) == 11  # BOS (skipped) + 2 prompt chars + 9 sampled, one char per id
    samples = {sample_text(model, tok, "ab", seed=s, max_length=12) for s in range(5)}
    assert len(samples) > 1


def _plain_top_k_sample(model, tok, prompt, seed, max_length, top_k=5):
    """EasyEdit's fluency generation written out: one row, the model's own defaults for the
    mask and positions, the cache carried along, top-k drawn from one seeded generator."""
    ids = tok(prompt, return_tensors="pt").input_ids  # [1, P]
    generator = torch.Generator().manual_seed(seed)
    name = cache_kwarg(model)
    step, cache = ids, None
    with torch.no_grad():
        while ids.shape[1] < max_length:
            out = model(input_ids=step, use_cache=True, **{name: cache})
            cache = getattr(out, name)
            top = out.logits[0, -1].float().softmax(-1).topk(top_k)
            choice = torch.multinomial(top.values / top.values.sum(), 1, generator=generator)
            step = top.indices[choice].view(1, 1)  # [1, 1]
            ids = torch.cat([ids, step], dim=1)
    text = tok.decode(ids[0], skip_special_tokens=True)
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sample_text_is_the_plain_generation(model_type):
    # one prompt goes through the batched sampler (explicit mask and positions): the same draws
    model, tok = build_tiny(model_type), CharTokenizer()
    for prompt, seed in (("ab", 0), ("hello", 3), ("x", 7)):
        expected = _plain_top_k_sample(model, tok, prompt, seed, 20)
        assert sample_text(model, tok, prompt, seed=seed, max_length=20) == expected


@pytest.mark.slow
def test_helpers_on_the_embedded_model(smollm2):
    from neuronpatch.metrics import fluency

    model, tok = smollm2
    predicted = predict_answer(model, tok, "The capital of France is", "Paris")
    assert predicted == tok(" Paris", add_special_tokens=False).input_ids  # it knows this one
    text = sample_text(model, tok, "The capital of France is", seed=0, max_length=16)
    assert text.startswith("The capital of France is")
    assert fluency(model, tok, "The capital of France is", seed=0, max_length=16) == ngram_entropy(
        text
    )
