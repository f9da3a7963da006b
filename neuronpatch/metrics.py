"""Knowledge-editing metrics as KnowEdit/EasyEdit compute them, plus the model-side helpers.

Pure functions first (checked by hand in the tests), then the ones that run a model:
teacher-forced argmax over answer positions, and seeded top-k generation for fluency.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from .arch import cache_kwarg, device_of
from .tokens import TeacherForced, teacher_forced

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher
# expansion around the normal quantile (error < 1e-4 there).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


# --- pure metrics ----------------------------------------------------------------------


def token_accuracy(predicted_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """Fraction of answer tokens the model predicted (teacher forced): Edit Succ, portability."""
    predicted, answer = list(predicted_ids), list(answer_ids)
    if len(predicted) != len(answer):
        raise ValueError(f"{len(predicted)} predictions for {len(answer)} answer tokens")
    if not answer:
        raise ValueError("no answer tokens to score")
    return sum(p == a for p, a in zip(predicted, answer, strict=True)) / len(answer)


def agreement(pre_ids: Sequence[int], post_ids: Sequence[int]) -> float:
    """Locality: fraction of answer positions whose post-edit argmax equals the pre-edit one."""
    return token_accuracy(post_ids, pre_ids)


def word_tokens(text: str) -> list[str]:
    """Word tokens as nltk's ``word_tokenize`` splits them, without its downloadable data.

    ``word_tokenize`` runs the Punkt sentence splitter with English parameters (data that
    must be downloaded), then the Treebank-style word tokenizer on each sentence. Here Punkt
    runs with empty parameters: it splits at the same sentence ends except after
    abbreviations it would have learned ("Mr.", "U.S."), whose period becomes its own token.
    """
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    words = NLTKWordTokenizer()
    return [
        w for sentence in PunktSentenceTokenizer().tokenize(text) for w in words.tokenize(sentence)
    ]


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Fluency of ``text``: entropy in bits of its word n-grams, weighted per n, averaged.

    With the defaults, (2/3 * H(bigrams) + 4/3 * H(trigrams)) / 2, as ROME and EasyEdit
    compute it; a text too short for any n-gram of some n contributes 0 for that n.
    """
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t confidence interval; NaN where undefined (n < 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


# --- model-side ------------------------------------------------------------------------


@torch.no_grad()
def argmax_at_answers(
    model: nn.Module, sequences: Sequence[TeacherForced], batch_size: int = 16, pad_id: int = 0
) -> list[list[int]]:
    """For each teacher-forced sequence, the model's argmax at the positions predicting its answer.

    Sequences are right-padded into batches: a causal model's logits at a real token never
    see the padding after it, and position ids count from 0 whatever the mask.
    """
    device = device_of(model)
    results: list[list[int]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(tf.input_ids.shape[1] for tf in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, S]
        for row, tf in enumerate(chunk):
            length = tf.input_ids.shape[1]
            input_ids[row, :length] = tf.input_ids[0].cpu()
            mask[row, :length] = 1
        logits = model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits  # [B, S, vocab]
        for row, tf in enumerate(chunk):
            positions = tf.answer_positions.to(logits.device)
            results.append(logits[row, positions].argmax(-1).tolist())
    return results


def predict_answers(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16
) -> list[list[int]]:
    """Argmax ids at the answer positions of each ``(prompt, answer)``, teacher forced, batched."""
    sequences = [teacher_forced(tokenizer, prompt, answer) for prompt, answer in pairs]
    return argmax_at_answers(model, sequences, batch_size, pad_token_id(tokenizer))


def predict_answer(model: nn.Module, tokenizer, prompt: str, answer: str) -> list[int]:
    """Argmax ids at the positions predicting ``answer`` after ``prompt``, teacher forced."""
    return predict_answers(model, tokenizer, [(prompt, answer)])[0]


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def sample_text(
    model: nn.Module, tokenizer, prompt: str, seed: int = 0, max_length: int = 100, top_k: int = 5
) -> str:
    """``prompt`` continued by top-k sampling to ``max_length`` tokens in all, seeded.

    As ROME's and EasyEdit's fluency test generates: the length counts the prompt's tokens,
    an end-of-text token does not stop it, and the decoded text (prompt included) is
    NFKD-normalised with blank lines turned into spaces. ``sample_texts`` of a batch of one
    (no padding: the plain one-row generation).
    """
    return sample_texts(model, tokenizer, [prompt], seed, max_length, top_k)[0]


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    seed: int = 0,
    max_length: int = 100,
    top_k: int = 5,
) -> list[str]:
    """``sample_text`` of every prompt, generated together in one left-padded batch.

    Each row draws from its own generator seeded with ``seed``, so row ``i`` is
    ``sample_text(model, tokenizer, prompts[i], seed, ...)`` up to floating-point rounding
    (batched matmuls round differently; a draw that lands on a boundary can then differ).
    Several times faster on a CPU, where one-token steps are bound by reading the weights.
    Under ``runtime.applied_per_row`` row ``i`` is sampled with patch ``i``.
    """
    if not prompts:
        return []
    device = device_of(model)
    encoded = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]  # [P_i] each
    width = max(len(e) for e in encoded)
    pad = pad_token_id(tokenizer)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, P]
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P]
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :], mask[row, width - len(e) :] = e, 1
    ids, mask = ids.to(device), mask.to(device)
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in prompts]
    cache_name = cache_kwarg(model)
    steps = max_length - min(len(e) for e in encoded)  # rows with longer prompts stop sooner
    step_input, positions, cache, drawn = ids, (mask.cumsum(-1) - 1).clamp(min=0), None, []
    for _ in range(max(steps, 0)):
        out = model(
            input_ids=step_input,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
        )
        cache = getattr(out, cache_name)
        top = out.logits[:, -1].float().softmax(-1).topk(top_k)  # [B, k]
        choice = torch.cat(
            [
                torch.multinomial(values / values.sum(), 1, generator=g)
                for values, g in zip(top.values, generators, strict=True)
            ]
        )  # [B]
        step_input = top.indices.gather(1, choice[:, None])  # [B, 1]
        drawn.append(step_input)
        mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)  # [B, P + t]
        positions = positions[:, -1:] + 1  # [B, 1]
    new = torch.cat(drawn, dim=1) if drawn else ids[:, :0]  # [B, steps]
    texts = []
    for e, row in zip(encoded, new, strict=True):
        texts.append(
            _decoded(tokenizer, torch.cat([e.to(device), row[: max(max_length - len(e), 0)]]))
        )
    return texts


def _decoded(tokenizer, ids: torch.Tensor) -> str:
    """A fluency sample's text as EasyEdit scores it: NFKD, blank lines turned into spaces."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def fluency(
    model: nn.Module, tokenizer, prompt: str, seed: int = 0, max_length: int = 100
) -> float:
    """N-gram entropy of a seeded top-5 sample of ``max_length`` tokens starting at ``prompt``."""
    return ngram_entropy(sample_text(model, tokenizer, prompt, seed, max_length))
