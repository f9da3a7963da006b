"""Edits that stay local (the default method): FiNE behind gates, and a locality term.

Plain FiNE adds its deltas at every position of every input, so any input that drives the
edited neurons carries the edit along. ``method="local"`` changes four things, each
switchable in ``LocalHparams`` so its effect can be measured:

1. **Gate** (``gate``): the patch stores a ``Gate`` keyed on the residual stream at layer
   ``gate_layer`` (centred on generic text). At run time its rows are added only from the
   first position whose residual matches the key (cosine > ``gate_threshold``) on, or for a
   query gate with a span only on the answer's positions (below). Three choices
   (``gate_key``):

   - ``"subject"``: the subject's last token at layer 1 (threshold 0.75). Inputs that never
     name the subject are untouched, but every prompt about the subject opens it, whatever
     the relation, and a differently spelled alias does not.
   - ``"query"``: the prompt's last token at the middle layer (threshold 0.9). By then the
     residual there encodes subject *and* relation, so the gate opens on the edited question
     (and on the subject's aliases, which the model already maps together) and stays shut on
     other relations of the subject. Measured gate-only on smollm2-135m, 60 records per
     dataset (``benchmarks/results/query_gate_smollm2.md``): shut on 87.5 % of
     relation-specificity, 89.3 % of forgetfulness and 86.7 % of CounterFact neighbourhood
     prompts; open on 91.7 % of subject-alias prompts, but on only 1.7 % of CounterFact
     paraphrases, whose wording differs from the prompt. Short prompts of the same relation
     about other subjects ("The currency of China is the" for an edit of Japan's) can match:
     the relation dominates their last token.
   - ``"both"`` (the default): the query gate, open only where the subject gate is open too
     (layer ``subject_layer``, threshold ``subject_threshold``). The conjunction shuts other
     relations of the subject *and* the relation asked of other subjects, at the price of
     aliases the subject key does not recognise.

     By default the subject gate reads layer 4 with ``subject_threshold="calibrated"``: per
     edit, the highest cosine the prompt reaches with each of ``OTHER_SUBJECTS`` and of the
     ``calibration_neighbours`` (8) whole words nearest the subject's last word in the input
     embeddings in the subject's place, plus ``subject_margin`` (0.02), and at least
     0.3. The list alone lets same-kind entities in ("The currency of China is the" opens an
     edit of Japan's at 0.653 over 0.621; "The chemical symbol for silver is" one of gold's);
     the neighbours (" China", " Korea" ...; " silver" ...) raise those thresholds to 0.702 /
     0.700 before the margin. Neighbours are taken only for a last word that is one token of 3+ letters
     (``vocabulary_neighbours``): a word piece's neighbours are noise that shut aliases out.
     End to end, WikiData_cf SAA (smollm2 / gemma3, n=30): 74.6 / 75.3 with a fixed 0.75 at
     layer 1, 98.7 / 92.6 calibrated on the list, 89.2 / 85.0 with the neighbours of any last
     token, 98.7 / 88.0 with whole-word neighbours and the margin (FiNE: 98.7 / 97.0); RSA and FA unchanged
     (``benchmarks/results/quality.md``).

   The query gate has a **span** (``query_span="target"``, the default): it is open on the
   target's token count of positions from its match, i.e. on the answer, and text generated
   after the answer runs on the unedited model. Without it (``query_span=None``) the gate
   stays open to the end of the sequence, and sampled continuations drift into repeating
   the new answer: smollm2 fluency 605 -> 450 on WikiData_cf and 602 -> 430 on ZsRE (n=75,
   H200 rows of ``benchmarks/results/quality.md``), like plain FiNE's 448.

   A **wording gate** (``wording_layer``, off unless set) reads the query key again at an
   early layer, where the last token's residual still encodes the question's last words
   rather than its meaning, and joins the chain below the query gate (threshold
   ``wording_threshold``, the query gate's span). It shuts the edited question asked inside
   a longer sentence, as in KnowEdit's Forgetfulness prompts ("The position held by X, which
   is not T, is"), which gemma3's middle layers read as the question itself: gate-only on
   held-out WikiData_cf records (300-379), the query gate opens on 51 % of them for gemma3
   and 13 % for smollm2; with a wording gate at layer 4 (0.88) on 13 % for gemma3, while
   subject-alias prompts go from 94.8 to 93.5 % open. Its price is wording: a rewording that
   ends differently ("..., as everyone knows, is") is shut too.

   A **word escape** (``strict_margin``, off unless set) makes the calibrated subject gate
   stricter (``strict_margin`` above its calibration instead of ``subject_margin``) except
   where the input holds one of the subject's words: word gates at ``WORD_LAYER`` (0), one
   per word of ``subject_words``, OR-ed into the strict gate (``Gate.any_of``, format v5).
   Same-kind strangers that only just pass the subject gate are shut; aliases sharing a word
   keep the lenient threshold. Gate-only on gemma3 (``benchmarks/subject_key.py``, records
   0-299, 0.1): CounterFact neighbourhood prompts shut 87.7 -> 93.3 %, WikiData_cf alias
   prompts open 92.6 -> 91.6 %.

2. **Neurons above the gate**: a gate must be known before the rows it guards run, so
   neurons are located in layers ``gate_layer + 1 .. L - frozen_layers - 1`` only.
3. **Locality term** (``negatives_weight``): KL(unedited || edited) on the same subject in
   other relations (``negative_templates``), where the gate is open too, so the edit learns
   to change this relation's answer and not everything said about the subject.
4. **Specific neurons** (``specific_neurons``): location scores are scaled by how much
   more a neuron fires on this prompt than on the subject's other relations.

The optimisation is FiNE's otherwise (same losses, steps, early stop, seed), at lr 1e-2
(FiNE's measured default; the subject-gate variants were measured at 5e-3). Edit quality of
every variant: docs/local.md and ``benchmarks/results/quality.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .arch import ModelArch, device_of, resolve
from .errors import InvalidHparamsError
from .fine import (
    EditJob,
    FineHparams,
    Negatives,
    NeuronScore,
    _activations,
    _candidate_layers,
    _scores,
    prepare_edit,
    run_job,
    select_top,
)
from .gates import GateBank
from .patch import Gate, Patch
from .request import EditRequest
from .tokens import teacher_forced

# Generic text (no named entity) whose mean residual centres the gate's cosine.
GENERIC_TEXT = (
    "The weather today is quite nice and",
    "In 1998, the company announced that",
    "She opened the door and saw",
    "The results of the experiment show that",
    "After a long day at work, he went home and",
    "There are many ways to solve this problem, but",
)

# Same subject, other relations: what an edit of one relation should leave alone.
NEGATIVE_TEMPLATES = (
    "{subject} is",
    "The gender of {subject} is",
    "{subject} was born in",
    "The occupation of {subject} is",
    "{subject} is located in",
    "The official language of {subject} is",
    "{subject} was founded by",
    "The name of the father of {subject} is",
)

# Other entities put in the subject's place to calibrate a subject gate's threshold.
OTHER_SUBJECTS = (
    "Paris",
    "Barack Obama",
    "Microsoft",
    "the Amazon River",
    "Germany",
    "Albert Einstein",
    "Toyota",
    "Mount Everest",
    "William Shakespeare",
    "Japan",
    "the Beatles",
    "Real Madrid",
)

GATE_KEYS = ("subject", "query", "both")
SUBJECT_GATE_LAYER = 1  # where gate_key="subject" reads its key by default
BOTH_SUBJECT_LAYER = 4  # where gate_key="both" reads its subject key by default
CALIBRATED = "calibrated"  # subject_threshold: set per edit from OTHER_SUBJECTS
TARGET_SPAN = "target"  # query_span: the target's token count
CALIBRATION_FLOOR = 0.3  # a calibrated subject threshold is never lower than this
MAX_CALIBRATED = 0.99  # nor higher than this (a gate threshold must stay below 1)
CALIBRATION_MARGIN = 0.02  # above the highest calibration cosine (see calibrated_threshold)
WORD_LAYER = 0  # where strict_margin's word gates read the subject's words (token identity)
AUTO = "auto"  # gate_threshold / wording_layer: as measured for this model (MEASURED)
QUERY_THRESHOLD = 0.9  # a query gate's fixed threshold
# a calibrated query threshold is never lower than ``query_floor`` nor higher than
# ``query_cap`` (QUERY_FLOOR and QUERY_CAP by default; see calibrated_query_threshold)
QUERY_FLOOR, QUERY_CAP = 0.85, 0.9
# (model_type, layers, hidden size) -> what "auto" means for that model, where measured to
# help (docs/local.md); other models: a fixed query threshold, no wording
# gate. gemma3-270m: a wording gate at layer 4 (WikiData_cf FA 59.9 -> 96.3 at n=300, SAA and
# RSA unchanged) and, with it, the query threshold calibrated per edit (n=300: ZsRE SAA 47.6 ->
# 58.7 and rephrase 84.4 -> 91.7, WikiData_cf SAA 91.6 -> 92.9, at a cost: RSA 95.0 -> 94.0,
# CounterFact neighbourhood 89.0 -> 87.7; docs/local.md); without the wording gate it had opened
# the query gate on the subject's other relations; and the word escape (strict_margin 0.1,
# n=300: CounterFact neighbourhood 87.7 -> 93.3, at WikiData_cf SAA 92.9 -> 92.0 and ZsRE SAA
# 58.7 -> 56.6, RSA, FA and rephrase unchanged, patches ~40 % larger; gate-only held-out
# 300-499: neighbourhood shut 86.0 -> 91.0 %, aliases 91.8 -> 91.2 %). smollm2-135m:
# the query threshold calibrated per edit (gate-only on 200 held-out records: 87.6 -> 90.7 %
# of alias prompts open, RSA and FA prompts unchanged); its best wording layer (2, at 0.95)
# would cost aliases more than it gains. A smaller subject margin (0.005) was measured and
# not taken: SAA 91.9 -> 92.5 on WikiData_cf, but it opens neighbourhood prompts
# ("The mother tongue of Angela Merkel is" for Danielle Darrieux's; docs/local.md).
MEASURED: dict[tuple[str, int, int], dict[str, Any]] = {
    ("gemma3_text", 18, 640): {
        "wording_layer": 4,
        "gate_threshold": CALIBRATED,
        "strict_margin": 0.1,
    },
    ("llama", 30, 576): {"gate_threshold": CALIBRATED},
}
_STOPWORDS = {"the", "of", "is", "was", "in", "by", "a", "an", "name", "to", "which", "with"}


@dataclass(frozen=True)
class LocalHparams(FineHparams):
    """FiNE's hyperparameters plus the gate and the locality term (see the module docstring)."""

    lr: float = 1e-2  # measured with the query gates (docs/local.md); the subject-gate rows at 5e-3
    gate: bool = True
    gate_key: str = "both"  # "subject", "query" or "both" (see the module docstring)
    # the gate reads the residual stream this decoder layer outputs (None: 1 for a subject key,
    # the middle layer for a query key)
    gate_layer: int | None = None
    # cosine with the centred key: a number, None (0.75 / 0.9 by key), "calibrated" (a query
    # gate's, per edit: calibrated_query_threshold) or "auto" (as MEASURED for the model)
    gate_threshold: float | str | None = AUTO
    # gate_key="both": the subject gate's layer and threshold: a cosine, or "calibrated" (per
    # edit: the highest cosine the prompt reaches with OTHER_SUBJECTS in the subject's place)
    subject_layer: int = BOTH_SUBJECT_LAYER
    subject_threshold: float | str = CALIBRATED
    # with subject_threshold="calibrated": also calibrate on this many whole words nearest
    # the subject's last token in the input embeddings (its own kind: China for Japan)
    calibration_neighbours: int = 8
    # positions a query gate stays open from a match: "target" (the target's token count,
    # i.e. the answer's positions; later generated text runs unedited), a number, or None
    # (to the end of the sequence, as gates did before spans)
    query_span: int | str | None = TARGET_SPAN
    # a query gate also needs the prompt's last token to match at this early layer (None: no
    # such gate), where its residual still encodes the question's last words: it shuts the
    # question asked inside a longer sentence ("X, which is not T, is"); cosine threshold
    # ``wording_threshold``, span as the query gate's (see the module docstring)
    # ("auto": the layer MEASURED for this model, else none)
    wording_layer: int | str | None = AUTO
    wording_threshold: float = 0.88
    # gate_threshold="calibrated": the highest threshold calibration may set. Higher shuts
    # more Forgetfulness prompts and some aliases (docs/local.md)
    query_cap: float = QUERY_CAP
    # gate_threshold="calibrated": the lowest threshold calibration may set. Lower opens more
    # reworded questions and aliases (ZsRE) and more of the subject's other relations and
    # of other subjects' same question (docs/local.md)
    query_floor: float = QUERY_FLOOR
    # subject_threshold="calibrated": how far above the highest calibration cosine. Lower
    # opens more aliases and more same-kind neighbours (docs/local.md);
    # below 0 (some calibration prompts pass) only with strict_margin, which shuts them again
    # unless they share a subject word
    subject_margin: float = CALIBRATION_MARGIN
    # gate_key="both" with a calibrated subject threshold: a stricter margin the subject gate
    # must clear unless the input holds one of the subject's words (a word gate at layer
    # WORD_LAYER opens; None: no such escape, the subject gate at subject_margin alone). Shuts
    # same-kind subjects that only just pass ("Lanciano" for "Gazzola") and keeps aliases that
    # share a word ("F Ortis" for "Fernanda Ortis"); see make_gates and docs/local.md ("auto":
    # as MEASURED for this model, else None)
    strict_margin: float | str | None = AUTO
    # KL weight at the position after the answer, where the span has shut the gate but the
    # positions before carry the edit: keeps what follows the new answer as the unedited
    # model would continue it (fluency); 0: off
    after_answer_kl: float = 0.0
    # positions that KL covers (mean over them): the answer's last, then the unedited model's
    # greedy continuation of after_answer_tokens - 1 tokens, which later positions read from
    # the edited ones through attention. Above 1 each edit is optimised on its own (slower)
    after_answer_tokens: int = 1
    negatives_weight: float = 0.0  # KL weight on same-subject, other-relation prompts
    negative_templates: tuple[str, ...] = NEGATIVE_TEMPLATES
    specific_neurons: bool = False  # rank neurons by score x specificity to this relation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_key not in GATE_KEYS:
            raise InvalidHparamsError(
                f"gate_key must be one of {', '.join(map(repr, GATE_KEYS))}, got {self.gate_key!r}"
            )
        if self.gate_threshold == CALIBRATED and self.gate_key == "subject":
            raise InvalidHparamsError(
                "gate_threshold='calibrated' calibrates a query gate; gate_key='subject' has "
                "none (its calibrated form is gate_key='both' with subject_threshold)"
            )
        for name in ("gate_threshold", "subject_threshold", "wording_threshold"):
            value = getattr(self, name)
            if name != "wording_threshold" and value == CALIBRATED:
                continue
            if name == "gate_threshold" and value == AUTO:
                continue
            if isinstance(value, str):
                raise InvalidHparamsError(
                    f"{name} must be a number or {CALIBRATED!r}, got {value!r}"
                )
            if value is not None and not -1.0 < value < 1.0:
                raise InvalidHparamsError(f"{name} must lie strictly between -1 and 1, got {value}")
        floor, cap = self.query_floor, self.query_cap
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < 1:
            raise InvalidHparamsError(f"query_floor must be a number in (0, 1), got {floor!r}")
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not floor <= cap < 1:
            raise InvalidHparamsError(
                f"query_cap must be a number in [{floor}, 1) (the calibrated query "
                f"threshold's floor, query_floor, and 1), got {cap!r}"
            )
        margin = self.subject_margin
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not -1 < margin < 1:
            raise InvalidHparamsError(f"subject_margin must be a number in (-1, 1), got {margin!r}")
        strict = self.strict_margin
        if margin < 0 and strict is None:
            raise InvalidHparamsError(
                f"subject_margin={margin} is below the calibration prompts' highest cosine, so "
                "the subject gate would open on other subjects; a negative margin needs a word "
                "escape that shuts them again: set strict_margin (e.g. 0.05), or a margin >= 0"
            )
        if strict is not None and strict != AUTO:
            if isinstance(strict, bool) or not isinstance(strict, int | float):
                raise InvalidHparamsError(
                    f"strict_margin must be a number, {AUTO!r} or None, got {strict!r}"
                )
            if not margin < strict < 1:
                raise InvalidHparamsError(
                    f"strict_margin must lie between subject_margin ({margin}) and 1, got {strict}"
                )
            if self.gate_key != "both" or self.subject_threshold != CALIBRATED:
                raise InvalidHparamsError(
                    "strict_margin raises a calibrated subject gate's threshold; it needs "
                    "gate_key='both' and subject_threshold='calibrated'"
                )
        span = self.query_span
        if (
            span != TARGET_SPAN
            and span is not None
            and (isinstance(span, bool) or not isinstance(span, int) or span < 1)
        ):
            raise InvalidHparamsError(
                f"query_span must be {TARGET_SPAN!r}, a whole number >= 1 or None, got {span!r}"
            )
        n = self.calibration_neighbours
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidHparamsError(f"calibration_neighbours must be an integer >= 0, got {n!r}")
        if self.subject_layer < 0:
            raise InvalidHparamsError(f"subject_layer must be >= 0, got {self.subject_layer}")
        if self.wording_layer not in (None, AUTO) and (
            isinstance(self.wording_layer, bool)
            or not isinstance(self.wording_layer, int)
            or self.wording_layer < 0
        ):
            raise InvalidHparamsError(
                f"wording_layer must be {AUTO!r}, None or an integer >= 0, "
                f"got {self.wording_layer!r}"
            )
        if self.gate_layer is not None and self.gate_layer < 0:
            raise InvalidHparamsError(f"gate_layer must be >= 0, got {self.gate_layer}")
        if self.after_answer_kl < 0:
            raise InvalidHparamsError(f"after_answer_kl must be >= 0, got {self.after_answer_kl}")
        if not isinstance(self.after_answer_tokens, int) or self.after_answer_tokens < 1:
            raise InvalidHparamsError(
                f"after_answer_tokens must be an integer >= 1, got {self.after_answer_tokens!r}"
            )
        if self.negatives_weight < 0:
            raise InvalidHparamsError(f"negatives_weight must be >= 0, got {self.negatives_weight}")
        object.__setattr__(self, "negative_templates", tuple(self.negative_templates))
        if any("{subject}" not in t for t in self.negative_templates):
            raise InvalidHparamsError("every negative template must contain '{subject}'")

    def threshold(self) -> float | str:
        """The gate's cosine threshold (``gate_threshold``, or the key's default), or
        ``"calibrated"`` (set per edit)."""
        if self.gate_threshold not in (None, AUTO):
            return self.gate_threshold
        return 0.75 if self.gate_key == "subject" else QUERY_THRESHOLD

    def for_model(self, arch: ModelArch) -> LocalHparams:
        """These hyperparameters with every ``"auto"`` resolved for ``arch`` as ``MEASURED``
        for it: a wording layer only where it fits below the query gate of a query or both
        key, a calibrated threshold only for a query gate, a strict margin only for a calibrated
        subject gate of a both key (and above its subject_margin); else None (no wording gate,
        the key's fixed threshold, no word escape)."""
        measured = MEASURED.get((arch.model_type, arch.num_layers, arch.hidden_size), {})
        resolved = {}
        if self.wording_layer == AUTO:
            layer = measured.get("wording_layer")
            fits = self.gate_key != "subject" and (
                layer is not None and layer < self.layer_of_gate(arch.num_layers)
            )
            resolved["wording_layer"] = layer if fits else None
        if self.gate_threshold == AUTO:
            threshold = measured.get("gate_threshold")
            resolved["gate_threshold"] = threshold if self.gate_key != "subject" else None
        if self.strict_margin == AUTO:
            strict = measured.get("strict_margin")
            fits = self.gate_key == "both" and self.subject_threshold == CALIBRATED
            resolved["strict_margin"] = (
                strict if fits and strict is not None and strict > self.subject_margin else None
            )
            if resolved["strict_margin"] is None and self.subject_margin < 0:
                raise InvalidHparamsError(
                    f"subject_margin={self.subject_margin} needs a word escape, and "
                    f"strict_margin='auto' gives none for this model ({arch.model_type}, "
                    f"{arch.num_layers} layers): set strict_margin (e.g. 0.05), or a margin >= 0"
                )
        return replace(self, **resolved) if resolved else self

    def layer_of_gate(self, num_layers: int) -> int:
        """The layer the gate reads (``gate_layer``, or the key's default for this depth)."""
        if self.gate_layer is not None:
            return self.gate_layer
        return SUBJECT_GATE_LAYER if self.gate_key == "subject" else num_layers // 2


class _Reached(Exception):
    """Raised by ``_residuals``' hook once the highest layer it needs has run."""


@torch.no_grad()
def _residuals(
    model: nn.Module, input_ids: torch.Tensor, layers, attention_mask=None
) -> dict[int, torch.Tensor]:
    """The residual stream each of ``layers`` outputs (what the runtime's gates read), from one
    forward pass that stops after the highest of them: [B, S] -> {layer: [B, S, hidden]}."""
    blocks = resolve(model).decoder_layers
    wanted = sorted(set(layers))
    states: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output) -> None:
            h = output[0] if isinstance(output, tuple) else output  # [B, S, hidden]
            states[layer] = h.float()
            if layer == wanted[-1]:
                raise _Reached  # the layers above change nothing read here

        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in wanted]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return states


def right_padded(rows: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded on the right with 0: ids and attention mask, [N, S] each."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[*row, *[0] * (width - len(row))] for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


def peak_cosines(
    model: nn.Module, tokenizer, gates: Sequence[Gate], texts: Sequence[str], batch: int = 32
) -> torch.Tensor:
    """The highest cosine each of ``gates`` (all reading one layer) reaches at any real
    position of each of ``texts`` (as the runtime matches), right-padded batches of ``batch``:
    [len(texts), len(gates)]."""
    device = device_of(model)
    layer = gates[0].layer
    bank = GateBank(gates, device)
    peaks = []
    for start in range(0, len(texts), batch):
        ids, mask = right_padded(
            [tokenizer(t).input_ids for t in texts[start : start + batch]], device
        )
        h = _residual(model, ids, layer, mask)  # [n, S, hidden]
        cosines = bank.cosine(h).masked_fill((mask == 0)[..., None], -math.inf)  # [n, S, G]
        peaks.append(cosines.amax(1))  # [n, G]
    return torch.cat(peaks)


def _residual(
    model: nn.Module, input_ids: torch.Tensor, layer: int, attention_mask=None
) -> torch.Tensor:
    """The residual stream decoder layer ``layer`` outputs: [B, S] -> [B, S, hidden]."""
    return _residuals(model, input_ids, (layer,), attention_mask)[layer]


# generic_centres' results while shared_centres() is active: (model, tokenizer, layers) -> ...
_SHARED_CENTRES: ContextVar[dict | None] = ContextVar("shared_centres", default=None)


@contextmanager
def shared_centres() -> Iterator[None]:
    """Within this block ``generic_centres`` runs once per model, tokenizer and layers, and
    later calls get the same tensors: for preparing many edits of an unchanging model (the
    result is the same as recomputing it each time, without the forward passes)."""
    token = _SHARED_CENTRES.set({})
    try:
        yield
    finally:
        _SHARED_CENTRES.reset(token)


def generic_centres(model: nn.Module, tokenizer, layers) -> dict[int, torch.Tensor]:
    """Mean residual at each of ``layers`` over generic text, position 0 (an attention sink)
    dropped: {layer: [hidden]}. One forward pass per text serves every layer."""
    shared = _SHARED_CENTRES.get()
    key = (id(model), id(tokenizer), tuple(sorted(set(layers))))
    if shared is not None and key in shared:
        return dict(shared[key])
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for text in GENERIC_TEXT:
        ids = torch.tensor([tokenizer(text).input_ids], device=device_of(model))
        for layer, h in _residuals(model, ids, layers).items():
            rows[layer].append(h[0, 1:])  # [S - 1, hidden]
    centres = {layer: torch.cat(r).mean(0) for layer, r in rows.items()}
    if shared is not None:
        shared[key] = dict(centres)
    return centres


def generic_centre(model: nn.Module, tokenizer, layer: int) -> torch.Tensor:
    """Mean residual at ``layer`` over generic text, position 0 dropped: [hidden]."""
    return generic_centres(model, tokenizer, (layer,))[layer]


def subject_end(tokenizer, prompt: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(prompt).input_ids``."""
    end = prompt.index(subject) + len(subject)
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        for i, (start, stop) in enumerate(offsets):
            if start < end <= stop:
                return i
        candidates = [i for i, (start, stop) in enumerate(offsets) if stop <= end and stop > 0]
        if candidates:
            return candidates[-1]
    except (NotImplementedError, TypeError, KeyError):
        pass  # slow or stand-in tokenizers: tokenise the prefix instead
    return len(tokenizer(prompt[:end]).input_ids) - 1


def _check_chain(hp: LocalHparams, layer: int) -> None:
    """Refuse gate settings that make no chain: the query gate (at ``layer``) must read above
    the subject gate and the wording gate, and a wording gate needs a query gate."""
    if hp.gate_key == "both" and layer <= hp.subject_layer:
        raise InvalidHparamsError(
            f"gate_key='both' reads its subject key at layer {hp.subject_layer}, so its query "
            f"gate must read a higher layer; got gate_layer={layer}"
        )
    if hp.wording_layer is None:
        return
    if hp.gate_key == "subject":
        raise InvalidHparamsError(
            "wording_layer reads the query key low down, but gate_key='subject' has no "
            "query gate; use gate_key='both' or 'query', or wording_layer=None"
        )
    if hp.wording_layer >= layer:
        raise InvalidHparamsError(
            f"wording_layer={hp.wording_layer} must be below the query gate's layer "
            f"{layer} (the query gate, highest, guards the rows)"
        )


def make_gates(
    model: nn.Module, tokenizer, request: EditRequest, hp: LocalHparams
) -> tuple[Gate, ...]:
    """The patch's gates for ``request``; the last one guards every row.

    A gate's key is the residual (centred on generic text) at its layer of the subject's
    last token (``"subject"``) or of the prompt's last token (``"query"``)."""
    arch = resolve(model)
    hp = hp.for_model(arch)
    layer = hp.layer_of_gate(arch.num_layers)
    _check_chain(hp, layer)
    if hp.gate_key == "both":
        specs = [
            ("subject", hp.subject_layer, hp.subject_threshold),
            ("query", layer, hp.threshold()),
        ]
    else:
        specs = [(hp.gate_key, layer, hp.threshold())]
    if hp.wording_layer is not None:
        # the query key read again low down; the chain runs up the layers (a subject gate
        # first where both read one layer: the required gate of a layer requires none)
        specs.append(("query", hp.wording_layer, hp.wording_threshold))
        specs.sort(key=lambda spec: (spec[1], spec[0] != "subject"))
    layers = sorted({spec[1] for spec in specs})
    centres = generic_centres(model, tokenizer, layers)  # {layer: [hidden]}
    ids = torch.tensor([tokenizer(request.prompt).input_ids], device=device_of(model))
    states = _residuals(model, ids, layers)  # {layer: [1, S, hidden]}
    span = hp.query_span
    if span == TARGET_SPAN:  # the answer's positions: the prompt's last, then the target's
        span = len(teacher_forced(tokenizer, request.prompt, request.target_new).answer_ids)
    gates: list[Gate] = []
    for kind, at, threshold in specs:
        h = states[at][0]  # [S, hidden]
        if kind == "subject":
            position = subject_end(tokenizer, request.prompt, request.subject)
        else:
            position = h.shape[0] - 1
        requires = len(gates) - 1 if gates else None  # each gate requires the one before
        gate = Gate(
            at,
            h[position] - centres[at],
            centres[at],
            0.0,
            kind,
            requires,
            span if kind == "query" else None,
        )
        if threshold == CALIBRATED and kind == "subject":
            near = vocabulary_neighbours(model, tokenizer, request, hp.calibration_neighbours)
            threshold = calibrated_threshold(
                model, tokenizer, request, gate, near, hp.subject_margin
            )
        elif threshold == CALIBRATED:
            threshold = calibrated_query_threshold(model, tokenizer, request, gate, hp)
        gates.append(replace(gate, threshold=threshold))
    if hp.strict_margin not in (None, AUTO):
        return _with_word_escape(model, tokenizer, request, hp, tuple(gates))
    return tuple(gates)


def subject_words(tokenizer, prompt: str, subject: str) -> list[int]:
    """The last token of each of the subject's words of 3+ characters (not stopwords) as
    indices into ``tokenizer(prompt).input_ids``; none where the tokenizer gives no offsets."""
    base = prompt.index(subject)
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        return []
    ends: list[int] = []
    for word in re.finditer(r"\w+", subject):
        if len(word.group()) < 3 or word.group().lower() in _STOPWORDS:
            continue
        end = base + word.end()
        ends += [i for i, (start, stop) in enumerate(offsets) if start < end <= stop][:1]
    return sorted(set(ends))


def _with_word_escape(
    model: nn.Module, tokenizer, request: EditRequest, hp: LocalHparams, chain: tuple[Gate, ...]
) -> tuple[Gate, ...]:
    """``chain`` (subject gate first) with the subject gate made strict unless a subject word is
    present: word gates at ``WORD_LAYER`` (one per word of ``subject_words``, each calibrated
    on ``OTHER_SUBJECTS`` in the subject's place like the subject gate), then the subject gate
    as it was (lenient), then a *strict* copy of it, ``strict_margin - subject_margin`` higher,
    open also wherever a word gate is (``any_of``) and only where the lenient one is
    (``requires``); the rest of the chain requires the strict gate:

        open = lenient AND (strict OR word_1 OR ... OR word_n) AND (the rest of the chain)
    """
    centre = generic_centre(model, tokenizer, WORD_LAYER)
    ids = torch.tensor([tokenizer(request.prompt).input_ids], device=device_of(model))
    h = _residual(model, ids, WORD_LAYER)[0]  # [S, hidden]
    words = [
        Gate(WORD_LAYER, h[i] - centre, centre, 0.0, "subject")
        for i in subject_words(tokenizer, request.prompt, request.subject)
    ]
    texts = other_subject_prompts(request)
    if words and texts:
        thresholds = _above(model, tokenizer, words, texts, CALIBRATION_FLOOR, MAX_CALIBRATED)
        words = [replace(g, threshold=t) for g, t in zip(words, thresholds, strict=True)]
    else:
        words = [replace(g, threshold=MAX_CALIBRATED) for g in words]
    lenient, rest = chain[0], chain[1:]
    n = len(words)
    strict = replace(
        lenient,
        threshold=min(lenient.threshold + hp.strict_margin - hp.subject_margin, MAX_CALIBRATED),
        requires=n,
        any_of=tuple(range(n)),
    )
    out = [*words, replace(lenient, requires=None), strict]
    for gate in rest:  # each requires the one before, as in the chain
        out.append(replace(gate, requires=len(out) - 1))
    return tuple(out)


def calibrated_threshold(
    model: nn.Module,
    tokenizer,
    request: EditRequest,
    gate: Gate,
    extra: Sequence[str] = (),
    margin: float = CALIBRATION_MARGIN,
) -> float:
    """The highest cosine ``gate`` reaches (any position, as the runtime matches) on the
    prompt with each of ``OTHER_SUBJECTS`` (and ``extra``) in the subject's place, plus
    ``CALIBRATION_MARGIN``, and at least ``CALIBRATION_FLOOR``: the gate then stays shut on
    those prompts and opens on inputs nearer the subject than any of them (a fixed threshold
    is too strict for aliases on some subjects and too loose on others).

    The prompts run as one right-padded batch (a prompt's cosine there differs from its cosine
    alone by rounding: below 1e-6 in fp32). The margin (0.02) shuts inputs that only just
    pass the calibration prompts: measured gate-only on smollm2 (60 WikiData_cf + 60
    CounterFact records), margins 0 / 0.02 / 0.05 keep the subject gate open on 90.0 / 90.0 /
    83.3 % of alias prompts and shut on 71.7 / 75.0 / 91.7 % of neighbourhood prompts, and
    0.02 shuts "The mother tongue of Angela Merkel is" (0.405) for an edit of Danielle
    Darrieux's (calibrated at 0.399). ``LocalHparams.subject_margin`` sets it; smaller ones,
    measured on more records, are in docs/local.md."""
    texts = other_subject_prompts(request, extra)
    if not texts:
        return CALIBRATION_FLOOR
    return _above(model, tokenizer, [gate], texts, CALIBRATION_FLOOR, MAX_CALIBRATED, margin)[0]


def other_subject_prompts(request: EditRequest, extra: Sequence[str] = ()) -> list[str]:
    """The prompt with each of ``OTHER_SUBJECTS`` (and ``extra``) in the subject's place, the
    subject itself left out: what a subject gate is calibrated to stay shut on."""
    return [
        request.prompt.replace(request.subject, other)
        for other in (*OTHER_SUBJECTS, *extra)
        if other.lower() != request.subject.lower()
    ]


def _above(
    model: nn.Module,
    tokenizer,
    gates: Sequence[Gate],
    texts: Sequence[str],
    floor: float,
    cap: float,
    margin: float = CALIBRATION_MARGIN,
) -> list[float]:
    """Per gate (all reading one layer), the highest cosine it reaches on ``texts`` plus
    ``margin``, kept within [floor, cap]: a threshold that shuts it on every one of them
    (below the cap)."""
    highest = peak_cosines(model, tokenizer, gates, texts).amax(0)  # [G]
    return [min(max(h + margin, floor), cap) for h in highest.tolist()]


def calibrated_query_threshold(
    model: nn.Module, tokenizer, request: EditRequest, gate: Gate, hp: LocalHparams
) -> float:
    """A query gate's threshold for ``request``: the highest cosine ``gate`` reaches on the
    subject's other relations (``negative_prompts`` of ``hp.negative_templates``) plus
    ``CALIBRATION_MARGIN``, kept within [``hp.query_floor``, ``hp.query_cap``] (0.85, 0.9).

    The fixed 0.9 shuts some aliases out ("The occupation of Kraehenb. is" reaches 0.87):
    where the subject's other relations stay well below it, the threshold comes down to meet
    them, and no lower than 0.85 (smollm2, gate-only on 200 held-out WikiData_cf records:
    87.6 -> 90.7 % of alias prompts open, relation-specificity and forgetfulness prompts as
    before). With no other relation to ask (every template names the edited one): 0.9."""
    texts = negative_prompts(request, hp.negative_templates)
    if not texts:
        return QUERY_THRESHOLD
    return _above(model, tokenizer, [gate], texts, hp.query_floor, hp.query_cap)[0]


def vocabulary_neighbours(model: nn.Module, tokenizer, request: EditRequest, k: int) -> list[str]:
    """The ``k`` whole words whose input embeddings are nearest (cosine) the subject's last
    token: entities of the subject's own kind (" China", " Korea" for " Japan"; " silver" for
    " gold"). Word-initial, alphabetic tokens of 3+ letters that are not part of the subject
    and do not share its last word's stem (first 5 letters: " assemblies" for " Assembly").

    None when the subject's last word is not one word-initial token of 3+ letters (" Japan"
    is; "go" of " Casariego", " BC" of "2041 BC" and a "Japan" opening the prompt are not):
    the neighbours of a word piece (" goes", " went") or an abbreviation are no kin of the
    subject, and calibrating on them shut the gate on its aliases ("Nicolás Méndez",
    "2041 BCE") in WikiData_counterfact."""
    if k == 0:
        return []
    last = tokenizer(request.prompt).input_ids[
        subject_end(tokenizer, request.prompt, request.subject)
    ]
    piece = tokenizer.decode([last])
    last_word = re.sub(r"[^\w]", "", request.subject.split()[-1]).lower()
    if not piece.startswith(" ") or piece.strip().lower() != last_word:
        return []
    if len(last_word) < 3 or not last_word.isalpha():
        return []  # " BC" of "2041 BC": its neighbours are other abbreviations (" ACC", " CAR")
    embeddings = model.get_input_embeddings().weight.detach().float()  # [V, hidden]
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [V, hidden]
    ranked = (unit @ unit[last]).topk(min(len(unit), 50 * k + 50)).indices.tolist()
    subject, stem = request.subject.lower(), last_word[:5]
    words: list[str] = []
    seen: set[str] = set()
    for token in ranked:
        text = tokenizer.decode([token])
        word = text.strip()
        if not text.startswith(" ") or not word.isalpha() or len(word) < 3:
            continue
        lower = word.lower()
        if lower in subject or subject in lower or lower.startswith(stem):
            continue
        if lower not in seen:
            seen.add(lower)
            words.append(word)
        if len(words) == k:
            break
    return words


def _gate_fn(model: nn.Module, gates: tuple[Gate, ...]) -> Callable:
    """Where the last of ``gates`` is open (with the gates it requires), as the runtime does."""
    banks = [GateBank([gate], device_of(model)) for gate in gates]

    def open_positions(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        valid = attention_mask.bool() if attention_mask is not None else None
        states = _residuals(model, input_ids, {g.layer for g in gates}, attention_mask)
        opened: list[torch.Tensor] = []
        for gate, bank in zip(gates, banks, strict=True):
            now = bank.open(states[gate.layer], valid)[..., 0]  # [B, S]
            for a in gate.any_of:
                now = now | opened[a]
            opened.append(now if gate.requires is None else now & opened[gate.requires])
        return opened[-1]

    return open_positions


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOPWORDS}


def negative_prompts(request: EditRequest, templates: tuple[str, ...]) -> list[str]:
    """Same-subject prompts of other relations; templates naming the edited relation are skipped."""
    relation = _content_words(request.prompt.replace(request.subject, " "))
    prompts = []
    for template in templates:
        words = _content_words(template.replace("{subject}", " "))
        if words and words <= relation:
            continue  # the template asks what the edit changes
        prompts.append(template.format(subject=request.subject))
    return prompts


def _negatives_fn(model: nn.Module, tokenizer, hp: LocalHparams) -> Callable:
    def build(request: EditRequest) -> Negatives | None:
        prompts = negative_prompts(request, hp.negative_templates)
        if not prompts or hp.negatives_weight == 0:
            return None
        rows = [tokenizer(p).input_ids for p in prompts]
        ids, mask = right_padded(rows)  # [N, S] each
        kl = torch.zeros(ids.shape, dtype=torch.bool)
        for n, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            kl[n, subject_end(tokenizer, prompt, request.subject) : len(row)] = True
        return Negatives(ids, mask, kl, hp.negatives_weight)

    return build


def locate_specific(
    model: nn.Module, tokenizer, request: EditRequest, hp: LocalHparams, layers
) -> list[NeuronScore]:
    """FiNE's location, with each score scaled by how specific the neuron is to this fact.

    A gated patch is open on every prompt about its subject, so a neuron that fires as
    strongly on the subject's other relations (``negative_prompts``) carries the edit there
    too. Specificity at target position t: relu(1 - a_neg / |q_t|), where a_neg is the
    neuron's largest |activation| on those prompts from the subject on; 0 for a neuron that
    fires at least as much elsewhere, 1 for one silent there.
    """
    arch = resolve(model)
    device = device_of(model)
    candidates = _candidate_layers(arch, hp.frozen_layers, layers)
    tf = teacher_forced(tokenizer, request.prompt, request.target_new, device)
    activations = _activations(model, arch, tf.input_ids)
    scores = _scores(model, arch, tf, candidates, activations)  # [T, L', inter]
    positions = tf.answer_positions.to(device)
    q_edit = torch.stack(
        [activations[1][layer][positions] for layer in candidates], 1
    )  # [T, L', inter]
    elsewhere = torch.zeros_like(q_edit[0])  # [L', inter]
    for prompt in negative_prompts(request, hp.negative_templates):
        ids = torch.tensor([tokenizer(prompt).input_ids], device=device)
        _, acts = _activations(model, arch, ids)
        start = subject_end(tokenizer, prompt, request.subject)
        for j, layer in enumerate(candidates):
            peak = acts[layer][start:].float().abs().amax(0)  # [inter]
            elsewhere[j] = torch.maximum(elsewhere[j], peak)
    specificity = (1 - elsewhere / q_edit.float().abs().clamp_min(1e-6)).clamp_min(0)
    return select_top(scores * specificity, candidates, hp.k)


def edit_local(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    hparams: LocalHparams | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Patch:
    """Edit one fact with the locality-aware method; ``model`` is left bitwise unchanged."""
    return run_job(model, prepare_local(model, tokenizer, request, hparams), progress)


def prepare_local(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    hparams: LocalHparams | None = None,
) -> EditJob:
    """The gates and located neurons of a locality-aware edit: the job ``run_job`` /
    ``run_jobs`` optimise."""
    request = EditRequest.coerce(request)
    arch: ModelArch = resolve(model)
    hp = (hparams or LocalHparams()).for_model(arch)
    top = arch.num_layers - hp.frozen_layers
    gate_layer = hp.layer_of_gate(arch.num_layers)
    if hp.gate and gate_layer >= arch.num_layers:
        raise InvalidHparamsError(
            f"gate_layer={gate_layer} is out of range for a model of {arch.num_layers} layers"
        )
    lowest = gate_layer + 1 if hp.gate else 0
    if lowest >= top:
        raise InvalidHparamsError(
            f"gate_layer={gate_layer} leaves no layer to edit below the frozen last "
            f"{hp.frozen_layers} of {arch.num_layers}; use a lower gate_layer"
        )
    layers = [layer for layer in (hp.layers or range(top)) if layer >= lowest]
    gates = make_gates(model, tokenizer, request, hp) if hp.gate else ()
    return prepare_edit(
        model,
        tokenizer,
        request,
        hp,
        method="local",
        layers=layers,
        gate=_gate_fn(model, gates) if gates else None,
        negatives=_negatives_fn(model, tokenizer, hp),
        gates=gates,
        locator=locate_specific if hp.specific_neurons else None,
    )
