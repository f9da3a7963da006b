"""FiNE: fine-grained neuron-level editing (Pan et al., ICLR 2025).

1. Locate: run the unedited model on ``prompt + target_new``; at each position that predicts
   a target token, score every neuron i of every non-frozen layer l by its contribution to
   the model's own predicted token t there:  c(l, i) = q_i^l * (W_U[t] . W_out^l[:, i]).
   Keep the top-k per position, jointly across layers; the union is the edit's neuron set.
2. Update: learn a delta row per located neuron (zeros init, Adam) minimising
   max-token NLL of target_new + alpha KL(orig || new) on the prompt + beta repetition
   penalty + gamma ||D||_2, stopping once every target token has probability > 0.9.
The result is a Patch; the model itself is never modified.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import fingerprint
from .arch import ModelArch, base_model_info, cache_kwarg, device_of, resolve
from .errors import InvalidHparamsError, InvalidRequestError
from .patch import Patch
from .request import EditRequest
from .tokens import TeacherForced, teacher_forced


@dataclass(frozen=True)
class FineHparams:
    """FiNE's hyperparameters; the defaults are the paper's, except ``lr`` (see README)."""

    k: int = 5  # neurons kept per target position (jointly across layers)
    frozen_layers: int = 3  # never edit the last l_f layers
    layers: tuple[int, ...] | None = None  # restrict location to these layers (ablation)
    random_neurons: bool = False  # ablation: as many random neurons instead of located ones
    max_steps: int = 50
    lr: float = 1e-2  # measured on SmolLM2: benchmarks/results/fine_lr_sweep.md
    alpha: float = 1.0  # KL on the prompt's own positions
    beta: float = 10.0  # repetition penalty after the target
    gamma: float = 0.1  # Frobenius norm of the deltas
    early_stop_prob: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InvalidHparamsError(f"k must be >= 1, got {self.k}")
        if self.frozen_layers < 0:
            raise InvalidHparamsError(f"frozen_layers must be >= 0, got {self.frozen_layers}")
        if self.max_steps < 0 or self.lr <= 0:
            raise InvalidHparamsError("max_steps must be >= 0 and lr > 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))


@dataclass(frozen=True)
class NeuronScore:
    """One located neuron: FFN ``index`` of ``layer`` and its contribution score."""

    layer: int
    index: int
    score: float


# --- locating --------------------------------------------------------------------------


@torch.no_grad()
def _activations(
    model: nn.Module, arch: ModelArch, input_ids: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [S, vocab] and every layer's W_out input q ([S, inter] each) for one sequence."""
    acts: list[torch.Tensor | None] = [None] * arch.num_layers

    def keep(layer: int):
        def hook(module, args, output):
            q = args[0].detach()  # [1, S, inter], or [S, inter] where the model flattens (OPT)
            acts[layer] = q.reshape(-1, q.shape[-1])  # [S, inter]

        return hook

    handles = [m.register_forward_hook(keep(layer)) for layer, m in enumerate(arch.w_out)]
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits[0]  # [S, vocab]
    finally:
        for handle in handles:
            handle.remove()
    return logits, acts


def _candidate_layers(
    arch: ModelArch, frozen_layers: int, layers: Sequence[int] | None
) -> list[int]:
    if layers is not None:
        bad = [layer for layer in layers if not 0 <= layer < arch.num_layers]
        if bad:
            raise InvalidHparamsError(f"layers {bad} out of range 0..{arch.num_layers - 1}")
        return sorted(set(layers))
    if frozen_layers >= arch.num_layers:
        raise InvalidHparamsError(
            f"frozen_layers={frozen_layers} freezes all {arch.num_layers} layers; use fewer"
        )
    return list(range(arch.num_layers - frozen_layers))


@torch.no_grad()
def _scores(
    model: nn.Module,
    arch: ModelArch,
    tf: TeacherForced,
    layers: list[int],
    activations: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Contribution scores c(l, i) at every target position: [T, len(layers), inter].

    ``activations`` is ``_activations(model, arch, tf.input_ids)`` when already computed.
    """
    logits, acts = activations or _activations(model, arch, tf.input_ids)
    positions = tf.answer_positions.to(logits.device)
    predicted = logits[positions].argmax(-1)  # [T]: the model's own next token
    unembed = model.get_output_embeddings().weight[predicted].float()  # [T, hidden]
    per_layer = []
    for layer in layers:
        weight = arch.w_out[layer].weight.float()
        # W_U[t] . W_out[:, i] for every neuron i: [T, inter]
        proj = unembed @ (weight.T if arch.spec.conv1d else weight)
        per_layer.append(acts[layer][positions].float() * proj)  # [T, inter]
    return torch.stack(per_layer, dim=1)  # [T, L', inter]


def locate(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    k: int = 5,
    frozen_layers: int = 3,
    layers: Sequence[int] | None = None,
) -> list[NeuronScore]:
    """The neurons FiNE would edit for ``request``, highest contribution first."""
    request = EditRequest.coerce(request)
    arch = resolve(model)
    candidates = _candidate_layers(arch, frozen_layers, layers)
    tf = teacher_forced(tokenizer, request.prompt, request.target_new, device_of(model))
    scores = _scores(model, arch, tf, candidates)  # [T, L', inter]
    return select_top(scores, candidates, k)


def select_top(scores: torch.Tensor, layers: Sequence[int], k: int) -> list[NeuronScore]:
    """The union over positions of each position's top-``k`` neurons, jointly across layers.

    ``scores`` is [T, len(layers), inter]; a neuron kept at several positions keeps its best.
    """
    inter = scores.shape[-1]
    top = scores.flatten(1).topk(k, dim=-1)  # per position, jointly across layers
    best: dict[tuple[int, int], float] = {}
    for value, flat in zip(
        top.values.flatten().tolist(), top.indices.flatten().tolist(), strict=True
    ):
        key = (layers[flat // inter], flat % inter)
        best[key] = max(best.get(key, -math.inf), value)
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return [NeuronScore(layer, index, score) for (layer, index), score in ranked]


def _random_neurons(
    model: nn.Module, arch: ModelArch, tf: TeacherForced, count: int, hp: FineHparams
) -> list[NeuronScore]:
    """The random-neuron ablation: ``count`` distinct neurons drawn uniformly, seeded."""
    candidates = _candidate_layers(arch, hp.frozen_layers, hp.layers)
    generator = torch.Generator().manual_seed(hp.seed)
    flat = torch.randperm(len(candidates) * arch.intermediate_size, generator=generator)[:count]
    scores = _scores(model, arch, tf, candidates).amax(0).flatten()  # [L' * inter]
    return sorted(
        (
            NeuronScore(
                candidates[f // arch.intermediate_size],
                f % arch.intermediate_size,
                float(scores[f]),
            )
            for f in flat.tolist()
        ),
        key=lambda n: (-n.score, n.layer, n.index),
    )


# --- updating --------------------------------------------------------------------------


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; restores both exactly.

    Freezing the weights also means backward stops at the lowest edited layer.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


@contextmanager
def _trainable_deltas(
    arch: ModelArch,
    groups: dict[int, torch.Tensor],
    deltas: dict[int, torch.Tensor],
    gate: torch.Tensor | None = None,
) -> Iterator[None]:
    """Hooks that add ``q[..., idx] @ D`` with D differentiable, removed on exit.

    ``gate`` [B, S, 1] (0/1) multiplies the rows per position, as a gated patch's runtime does.
    """

    def add(layer: int):
        def hook(module, args, output):
            q = args[0]  # [B, S, inter]
            rows = q[..., groups[layer]]  # [B, S, k_l]
            if gate is not None:
                rows = rows * gate.to(q.dtype)
            return output + rows @ deltas[layer].to(q.dtype)  # [B, S, hidden]

        return hook

    handles = [arch.w_out[layer].register_forward_hook(add(layer)) for layer in groups]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _replayed_prefix(
    arch: ModelArch, first_edited: int, input_ids, model, attention_mask=None
) -> Iterator[torch.Tensor]:
    """Replay the outputs of the layers below the lowest edited one instead of recomputing them.

    Deltas only change what happens from ``first_edited`` upwards, so the blocks below give
    the same output at every optimisation step: record each once, then return the record.
    Yields the unedited logits [B, S, vocab] of the recording pass.
    """
    prefix = _Prefix(arch.decoder_layers[:first_edited])
    with prefix.installed():
        with torch.no_grad():
            out, outputs = prefix.run(
                model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        prefix.replay(outputs)
        yield out.logits


class _Prefix:
    """The blocks below the lowest edited layer, replayed from a record while ``on``
    (deltas only change what happens above them).

    A single edit records one pass (``run``) and ``replay``s it as it was. The batched
    optimisation ``record``s each sequence on its own ([1, S, hidden] per block) and
    ``assemble``s the records of the rows in the batch, right-padded; blocks that return more
    than their hidden states (tuples, in some models and transformers versions) are then not
    replayed but run for real every step."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks, self.on, self.replays = list(blocks), False, True
        self.current: list = [None] * len(self.blocks)
        self._last: list = [None] * len(self.blocks)

    @contextmanager
    def installed(self) -> Iterator[None]:
        def keep(i: int):
            def hook(module, args, output) -> None:
                if not self.on:
                    self._last[i] = output

            return hook

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        for i, block in enumerate(self.blocks):
            block.forward = lambda *a, _i=i, _real=block.forward, **k: (
                self.current[_i] if self.on and self.replays else _real(*a, **k)
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for block in self.blocks:
                del block.forward

    def run(self, model: nn.Module, **inputs):
        """One real pass of the model: its output, and what each block output ([B, S, hidden],
        or whatever the block returns)."""
        self.on = False
        out = model(**inputs)
        return out, list(self._last)

    def record(self, model: nn.Module, input_ids: torch.Tensor):
        """One real pass of ``input_ids`` [1, S] for ``assemble``: its output (logits [1, S,
        vocab] and the key/value cache) and each block's output, or none when a block returns
        more than its hidden states (then no block is replayed)."""
        out, blocks = self.run(model, input_ids=input_ids, use_cache=True)
        if not all(isinstance(b, torch.Tensor) for b in blocks):
            self.replays, blocks = False, []
        return out, blocks

    def replay(self, outputs: list) -> None:
        """From now on the blocks return ``outputs`` (one per block) as they are."""
        self.current, self.on = list(outputs), True

    def assemble(self, records: Sequence[list], width: int) -> None:
        """Replay these rows' records (each [1, S_b, hidden] per block), right-padded to
        ``width`` and stacked: [B', width, hidden] per block."""
        if self.replays:
            for i in range(len(self.blocks)):
                self.current[i] = torch.cat(
                    [F.pad(r[i], (0, 0, 0, width - r[i].shape[1])) for r in records]
                )


@dataclass(frozen=True)
class Negatives:
    """Extra sequences whose next-token distributions the edit must keep (a locality term).

    Rows are right-padded; ``kl_mask`` marks the positions whose distribution is kept.
    """

    input_ids: torch.Tensor  # int64 [N, S]
    attention_mask: torch.Tensor  # int64 [N, S]
    kl_mask: torch.Tensor  # bool [N, S]
    weight: float
    gate: torch.Tensor | None = None  # float [N, S]: where a gated patch would be open


@dataclass
class EditJob:
    """One request, located and ready to optimise (``prepare_edit``); ``run_job`` finishes it.

    Several jobs made with the same hyperparameters can be optimised in one batch
    (``run_jobs``)."""

    request: EditRequest
    method: str
    hp: FineHparams
    tf: TeacherForced
    neurons: list[NeuronScore]
    groups: dict[int, list[int]]  # layer -> neuron indices, ascending
    index_tensors: dict[int, torch.Tensor]  # the same, as int64 tensors on the model's device
    gate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    negatives: Negatives | None = None
    gates: tuple = ()
    extra: dict | None = None
    seconds: float = 0.0  # spent preparing


@dataclass
class Optimised:
    """What optimising one job gave: its deltas ([k_l, hidden] per layer), the steps taken,
    the final minimum target-token probability, and its share of the wall time."""

    deltas: dict[int, torch.Tensor]
    steps: int
    min_prob: float
    seconds: float


def edit_fine(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    hparams: FineHparams | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Patch:
    """Edit one fact with FiNE and return it as a Patch; ``model`` is left bitwise unchanged.

    ``progress(step, min_target_prob)`` is called after every forward pass.
    """
    return run_job(model, prepare_fine(model, tokenizer, request, hparams), progress)


def prepare_fine(
    model: nn.Module, tokenizer, request: EditRequest | dict, hparams: FineHparams | None = None
) -> EditJob:
    """FiNE's location for ``request``: the job ``run_job`` / ``run_jobs`` optimise."""
    return prepare_edit(model, tokenizer, request, hparams or FineHparams(), method="fine")


def prepare_edit(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    hp: FineHparams,
    *,
    method: str,
    layers: Sequence[int] | None = None,
    gate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    negatives: Callable[[EditRequest], Negatives | None] | None = None,
    gates: tuple = (),
    extra: dict | None = None,
    locator: Callable[..., list[NeuronScore]] | None = None,
) -> EditJob:
    """FiNE's location, with the hooks the locality-aware variants need.

    ``layers`` overrides where neurons may be located; ``gate(ids [B, S], mask) -> [B, S]``
    gives where the patch will be open (its rows are multiplied by it during optimisation);
    ``negatives(request)`` adds a KL term keeping other sequences' distributions; ``gates``
    are stored in the patch, the last one guarding every row. ``locator(model, tokenizer, request, hp,
    layers) -> [NeuronScore]`` replaces FiNE's contribution-score location (another method's
    neuron choice, same optimisation).
    """
    request = EditRequest.coerce(request)
    arch = resolve(model)
    started = time.perf_counter()
    device = device_of(model)
    tf = teacher_forced(tokenizer, request.prompt, request.target_new, device)
    if len(tf.answer_ids) == 0:
        raise InvalidRequestError(f"target_new {request.target_new!r} tokenises to nothing")
    where = hp.layers if layers is None else layers

    with _frozen(model):
        if locator is not None:
            neurons = locator(model, tokenizer, request, hp, where)
        else:
            neurons = locate(model, tokenizer, request, hp.k, hp.frozen_layers, where)
        if hp.random_neurons:
            neurons = _random_neurons(model, arch, tf, len(neurons), replace(hp, layers=where))
        groups: dict[int, list[int]] = {}
        for neuron in sorted(neurons, key=lambda n: (n.layer, n.index)):
            groups.setdefault(neuron.layer, []).append(neuron.index)
        index_tensors = {layer: torch.tensor(ix, device=device) for layer, ix in groups.items()}
        negs = negatives(request) if negatives is not None else None
    return EditJob(
        request,
        method,
        hp,
        tf,
        neurons,
        groups,
        index_tensors,
        gate,
        negs,
        gates,
        extra,
        time.perf_counter() - started,
    )


def run_job(
    model: nn.Module, job: EditJob, progress: Callable[[int, float], None] | None = None
) -> Patch:
    """Optimise one prepared edit on its own and return its Patch."""
    return finish_edit(model, job, optimise_jobs(model, [job], progress)[0])


def run_jobs(
    model: nn.Module,
    jobs: Sequence[EditJob],
    progress: Callable[[int, float], None] | None = None,
    *,
    batch_size: int = 1,
) -> list[Patch]:
    """Optimise prepared edits, ``batch_size`` at a time (``optimise_jobs``); their Patches."""
    optimised = optimise_jobs(model, jobs, progress, batch_size=batch_size)
    return [finish_edit(model, job, result) for job, result in zip(jobs, optimised, strict=True)]


def optimise_jobs(
    model: nn.Module,
    jobs: Sequence[EditJob],
    progress: Callable[[int, float], None] | None = None,
    *,
    batch_size: int = 1,
    done: Callable[[int, Optimised], None] | None = None,
) -> list[Optimised]:
    """Learn each job's deltas; jobs are independent edits of the unedited model.

    With ``batch_size`` 1, for a job with negatives (its batch already holds them), or for
    one whose after-answer KL covers a continuation, a job is optimised on its own
    (``_optimise``: exactly a single edit); otherwise up to ``batch_size`` share each forward
    and backward pass (``_optimise_batch``: the same result up to floating-point rounding).
    All jobs must share their hyperparameters. ``done(i, result)`` is called as job i
    finishes.
    """
    if len({job.hp for job in jobs}) > 1:
        raise InvalidHparamsError("edits optimised together must share their hyperparameters")
    arch = resolve(model)
    results: list[Optimised | None] = [None] * len(jobs)
    together = (
        [
            i
            for i, job in enumerate(jobs)
            if job.negatives is None and not _continuation_tokens(job.hp)
        ]
        if batch_size > 1
        else []
    )
    with _frozen(model):
        for i, job in enumerate(jobs):
            if i in together:
                continue
            started = time.perf_counter()
            deltas, steps, min_prob = _optimise(
                model,
                arch,
                job.tf,
                job.index_tensors,
                job.hp,
                progress,
                gate=job.gate,
                negatives=job.negatives,
            )
            results[i] = Optimised(deltas, steps, min_prob, time.perf_counter() - started)
            if done is not None:
                done(i, results[i])
        if together:

            def finished(position: int, result: Optimised) -> None:
                results[together[position]] = result
                if done is not None:
                    done(together[position], result)

            _optimise_batch(
                model, arch, [jobs[i] for i in together], batch_size, progress, finished
            )
    return results  # type: ignore[return-value]


def _continuation_tokens(hp: FineHparams) -> int:
    """The tokens of unedited continuation the after-answer KL covers past the answer's last
    position (0: none, or no such term; above 0 the edit is optimised on its own)."""
    if not getattr(hp, "after_answer_kl", 0.0):
        return 0
    return getattr(hp, "after_answer_tokens", 1) - 1


def finish_edit(model: nn.Module, job: EditJob, done: Optimised) -> Patch:
    """The Patch of an optimised job (warning if it stopped short or had nothing to do)."""
    request, hp, steps, min_prob = job.request, job.hp, done.steps, done.min_prob
    success = min_prob > hp.early_stop_prob
    metrics = {
        "steps": steps,
        "target_prob": round(min_prob, 6),
        "success": success,
        "num_neurons": len(job.neurons),
    }
    if "SOURCE_DATE_EPOCH" not in os.environ:  # a pinned clock means: no clock readings at all
        metrics["wall_time_s"] = round(job.seconds + done.seconds, 3)
    gates = job.gates
    if steps == 0:
        warnings.warn(
            f"the model already predicts {request.target_new!r} for {request.prompt!r} "
            f"(every target token p > {hp.early_stop_prob}); the patch is empty",
            stacklevel=4,
        )
        patch_layers: dict[int, tuple] = {}
        gates = ()
    else:
        if not success:
            warnings.warn(
                f"edit of {request.prompt!r} -> {request.target_new!r} stopped after {steps} steps "
                f"with target probability {min_prob:.3f} < {hp.early_stop_prob}; "
                "try a higher lr or more max_steps",
                stacklevel=4,
            )
        patch_layers = {
            layer: (job.index_tensors[layer].cpu(), done.deltas[layer].detach().cpu())
            # every row guarded by the last gate (which may require the earlier ones)
            + ((torch.full((len(job.groups[layer]),), len(gates) - 1),) if gates else ())
            for layer in job.groups
        }
    arch = resolve(model)
    return Patch(
        layers=patch_layers,
        base=base_model_info(model),
        base_fingerprint=fingerprint.compute(arch),
        gates=gates,
        requests=(request.to_dict(),),
        method=job.method,
        hparams=asdict(hp),
        metrics=metrics,
        extra={"neurons": [asdict(n) for n in job.neurons], **(job.extra or {})},
    )


def _fine_loss(
    logp: torch.Tensor,
    tf: TeacherForced,
    orig_logp: torch.Tensor,
    deltas: dict[int, torch.Tensor],
    hp: FineHparams,
    target_logp: torch.Tensor,
    start: int = 0,
    orig_after: torch.Tensor | None = None,
    new_after: torch.Tensor | None = None,
) -> torch.Tensor:
    """FiNE's loss for one edit sequence: ``logp`` [S - start, vocab] edited from position
    ``start`` on, ``orig_logp`` [P-1, vocab] unedited on the prompt, ``target_logp`` [T] the
    target tokens' log-probabilities.

    With ``start`` > 0 the positions before it are left out: the caller guarantees that the
    deltas do not reach them (a gate still shut there), so their KL terms are 0; the KL is
    still the mean over the prompt's P-1 positions. ``orig_after`` [vocab] or [K, vocab]: the
    unedited log-probabilities after the answer (its last position, and K-1 positions of a
    continuation whose edited ones are ``new_after`` [K, vocab]); given, their mean KL is added
    with weight ``hp.after_answer_kl`` (a ``LocalHparams`` term, not FiNE's)."""
    loss_edit = -target_logp.min()
    if tf.prompt_len - 1 <= start:
        kl = logp.new_zeros(())
    else:
        new_logp = logp[: tf.prompt_len - 1 - start]  # the prompt but its last position
        terms = (orig_logp[start:].exp() * (orig_logp[start:] - new_logp)).sum(-1)
        kl = terms.mean() if start == 0 else terms.sum() / (tf.prompt_len - 1)
    p_after = logp[-1, tf.answer_ids].exp()  # [T]: repeating the target
    penalty = -torch.log1p(-p_after.clamp(max=1 - 1e-6)).max()
    norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas.values()]))
    loss = loss_edit + hp.alpha * kl + hp.beta * penalty + hp.gamma * norm
    if orig_after is not None:  # what follows the answer: as the unedited model, given it
        orig_after = orig_after.reshape(-1, orig_after.shape[-1])  # [K, vocab]
        new_after = logp[-1:] if new_after is None else new_after  # [K, vocab]
        after = (orig_after.exp() * (orig_after - new_after)).sum(-1).mean()
        loss = loss + hp.after_answer_kl * after
    return loss


def _optimise(
    model: nn.Module,
    arch: ModelArch,
    tf: TeacherForced,
    index_tensors: dict[int, torch.Tensor],
    hp: FineHparams,
    progress: Callable[[int, float], None] | None,
    *,
    gate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    negatives: Negatives | None = None,
) -> tuple[dict[int, torch.Tensor], int, float]:
    """Learn the deltas (FiNE's losses, plus the optional negatives' KL); returns them,
    the steps taken and the final minimum target-token probability."""
    device = tf.input_ids.device
    deltas = {
        layer: torch.zeros(len(ix), arch.hidden_size, device=device, requires_grad=True)
        for layer, ix in index_tensors.items()
    }  # [k_l, hidden] each, fp32 whatever the model dtype
    optimizer = torch.optim.Adam(deltas.values(), lr=hp.lr)

    # one batch: the edit sequence in row 0 (and the continuation its after-answer KL
    # covers), then the negatives, right-padded to S
    length = tf.input_ids.shape[1]
    after_kl = bool(getattr(hp, "after_answer_kl", 0.0))
    seq = _greedy_continuation(model, tf.input_ids, _continuation_tokens(hp))  # [1, S0 + C]
    full = seq.shape[1]
    input_ids, attention_mask = seq, None
    if negatives is not None:
        width = max(full, negatives.input_ids.shape[1])
        input_ids = torch.stack(
            [F.pad(seq[0], (0, width - full))]
            + [F.pad(row, (0, width - len(row))) for row in negatives.input_ids.to(device)]
        )  # [1 + N, S]
        attention_mask = torch.stack(
            [F.pad(torch.ones(full, dtype=torch.long, device=device), (0, width - full))]
            + [F.pad(row, (0, width - len(row))) for row in negatives.attention_mask.to(device)]
        )  # [1 + N, S]
        kl_mask = F.pad(negatives.kl_mask.to(device), (0, width - negatives.kl_mask.shape[1]))
    gate_mask = (
        gate(input_ids, attention_mask)[..., None].float() if gate is not None else None
    )  # [B, S, 1]

    positions = tf.answer_positions.to(device)
    stop_nll = -math.log(hp.early_stop_prob)

    steps, min_prob = 0, 0.0
    first_edited = min(index_tensors, default=0)
    with (
        _replayed_prefix(arch, first_edited, input_ids, model, attention_mask) as orig,
        _trainable_deltas(arch, index_tensors, deltas, gate_mask),
    ):
        # [P-1, vocab]: KL on the prompt but its last position
        orig_logp = F.log_softmax(orig[0, : tf.prompt_len - 1].float(), dim=-1)
        orig_after = (
            F.log_softmax(orig[0, length - 1 : full].float(), dim=-1)  # [1 + C, vocab]
            if after_kl
            else None
        )
        if negatives is not None:
            neg_orig = F.log_softmax(orig[1:][kl_mask].float(), dim=-1)  # [M, vocab]
        while True:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            all_logp = F.log_softmax(out.logits.float(), dim=-1)  # [B, S, vocab]
            logp = all_logp[0, :length]  # [S0, vocab]
            target_logp = logp[positions, tf.answer_ids]  # [T]
            min_prob = float(target_logp.detach().min().exp())
            if progress is not None:
                progress(steps, min_prob)
            if float(-target_logp.detach().min()) < stop_nll or steps >= hp.max_steps:
                break
            new_after = all_logp[0, length - 1 : full] if after_kl else None  # [1 + C, vocab]
            loss = _fine_loss(
                logp, tf, orig_logp, deltas, hp, target_logp, 0, orig_after, new_after
            )
            if negatives is not None and len(neg_orig):
                neg_new = all_logp[1:][kl_mask]  # [M, vocab]
                neg_kl = (neg_orig.exp() * (neg_orig - neg_new)).sum(-1).mean()
                loss = loss + negatives.weight * neg_kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return deltas, steps, min_prob


@torch.no_grad()
def _greedy_continuation(model: nn.Module, input_ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """``input_ids`` [1, S] followed by the model's ``tokens`` greedy next tokens [1, S + n]."""
    for _ in range(tokens):
        next_id = model(input_ids=input_ids, use_cache=False).logits[0, -1].argmax()
        input_ids = torch.cat([input_ids, next_id.view(1, 1)], dim=1)
    return input_ids


class _BatchDeltas:
    """Forward hooks on W_out that add each batch row's own deltas: row r of the batch gets
    ``q[r, :, idx_r] @ D_r`` (times its gate) at every layer its edit touches. Shorter
    neuron lists are padded with zero rows, so one gather and one batched product serve all.
    """

    def __init__(
        self,
        arch: ModelArch,
        index: Sequence[dict[int, torch.Tensor]],
        deltas: list[dict[int, torch.Tensor]],
    ) -> None:
        self.arch, self.index, self.deltas = arch, index, deltas  # per job
        self.layers = sorted({layer for ix in index for layer in ix})
        self.rows: list[int] = []
        self.plan: dict[int, torch.Tensor] = {}  # layer -> neuron indices [B', width], 0-padded
        self.gate: torch.Tensor | None = None  # [B', S, 1]
        self.enabled = True

    def select(self, rows: list[int], gate: torch.Tensor) -> None:
        """The batch now holds these jobs' rows, in this order, open where ``gate`` [B', S, 1]."""
        self.rows, self.gate, self.plan = rows, gate, {}
        for layer in self.layers:
            width = max(len(self.index[b].get(layer, ())) for b in rows)
            if width == 0:
                continue
            idx = torch.zeros(len(rows), width, dtype=torch.long, device=gate.device)
            for pos, b in enumerate(rows):
                ix = self.index[b].get(layer)
                if ix is not None:
                    idx[pos, : len(ix)] = ix
            self.plan[layer] = idx

    def _stacked(self, layer: int, width: int) -> torch.Tensor:
        """Every row's deltas at ``layer``, zero-padded to ``width``: [B', width, hidden]."""
        parts = []
        for b in self.rows:
            d = self.deltas[b].get(layer)  # [k, hidden] or None
            if d is None:
                parts.append(torch.zeros(width, self.arch.hidden_size, device=self.gate.device))
            else:
                parts.append(F.pad(d, (0, 0, 0, width - d.shape[0])))
        return torch.stack(parts)

    def hook(self, layer: int):
        def add(module, args, output):
            idx = self.plan.get(layer)
            if idx is None or not self.enabled:
                return output
            q = args[0]
            q = q.reshape(len(self.rows), -1, q.shape[-1])  # [B', S, inter] (OPT flattens)
            picked = q.gather(-1, idx[:, None, :].expand(-1, q.shape[1], -1))  # [B', S, width]
            picked = picked * self.gate.to(q.dtype)
            added = torch.bmm(picked, self._stacked(layer, idx.shape[1]).to(q.dtype))
            return output + added.reshape(output.shape)  # [B', S, hidden]

        return add

    @contextmanager
    def hooks(self) -> Iterator[None]:
        w_out = self.arch.w_out
        handles = [w_out[layer].register_forward_hook(self.hook(layer)) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class _Admitted:
    """What a job brings into the batch, computed on its sequence alone, unedited."""

    start: int  # first position the deltas can reach (its gate's first open one, <= P-1)
    gate: torch.Tensor  # float [S - start]: where the gate is open, from ``start``
    orig_logp: torch.Tensor  # [P-1, vocab]: unedited log-probabilities on the prompt
    orig_after: torch.Tensor | None  # [vocab]: unedited after the answer (after_answer_kl)
    blocks: list  # the outputs of the blocks below the lowest edited layer, from ``start``
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H, start, d]


def _cache_of(output):
    """The key/value cache a forward pass returned (``cache``, formerly ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _left_padded(caches: Sequence[list], past: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the rows' cached keys and values ([1, H, start_b, d] each) padded on the left
    to ``past`` positions and stacked: [B', H, past, d]."""
    return [
        tuple(  # type: ignore[misc]
            torch.cat([F.pad(c[layer][i], (0, 0, past - c[layer][i].shape[2], 0)) for c in caches])
            for i in (0, 1)
        )
        for layer in range(len(caches[0]))
    ]


def _first_open(gate: torch.Tensor, prompt_len: int) -> int:
    """The first position where ``gate`` [S] is open, at most P-1 (the first one whose logits
    the loss needs)."""
    opened = torch.nonzero(gate > 0)
    first = int(opened[0, 0]) if len(opened) else prompt_len - 1
    return min(first, prompt_len - 1)


def _optimise_batch(
    model: nn.Module,
    arch: ModelArch,
    jobs: Sequence[EditJob],
    batch_size: int,
    progress: Callable[[int, float], None] | None,
    done: Callable[[int, Optimised], None] | None = None,
) -> list[Optimised]:
    """FiNE's optimisation of several edits at once: up to ``batch_size`` share each forward
    and backward pass, and a job that meets its stopping rule leaves the batch for the next.

    Row b of the batch is one job's sequence; its deltas are added to its row only, its loss
    depends on them only, and each job has its own Adam, so each job's gradients and updates
    are those it would get alone, up to floating-point rounding (the padded, batched products
    sum in another order). Each job's gate, unedited logits, the outputs of the blocks below
    the lowest edited layer and the keys and values of the positions before its gate first
    opens are computed once, on its sequence alone: the deltas cannot change them. A step
    then runs only the positions from where the gate opens (for the default gated edit: the
    answer's, a few of ~20), left-padded key/value caches and right-padded positions in one
    batch. On a CPU a step costs about the same for one row as for several, which is where
    the speed comes from (``benchmarks/results/edit_speed.md``). ``done(i, result)`` is called
    as job i finishes.
    """
    from transformers import DynamicCache  # noqa: PLC0415 -- only the batched path needs it

    hp = jobs[0].hp
    device = jobs[0].tf.input_ids.device
    cache_name = cache_kwarg(model)
    stop_nll = -math.log(hp.early_stop_prob)
    after_kl = bool(getattr(hp, "after_answer_kl", 0.0))
    lengths = [job.tf.input_ids.shape[1] for job in jobs]
    deltas: list[dict[int, torch.Tensor]] = [{} for _ in jobs]
    optimizers: list[torch.optim.Optimizer | None] = [None] * len(jobs)
    kept: dict[int, _Admitted] = {}
    steps, seconds = [0] * len(jobs), [0.0] * len(jobs)
    results: list[Optimised | None] = [None] * len(jobs)
    bank = _BatchDeltas(arch, [job.index_tensors for job in jobs], deltas)
    prefix = _Prefix(arch.decoder_layers[: min(min(j.index_tensors, default=0) for j in jobs)])

    def admit(b: int) -> None:
        started, job = time.perf_counter(), jobs[b]
        bank.enabled, prefix.on = False, False  # the job's own sequence, unedited and in full
        with torch.no_grad():
            gate = (
                job.gate(job.tf.input_ids, None)[0].float()  # [S]
                if job.gate is not None
                else torch.ones(lengths[b], device=device)
            )
            out, blocks = prefix.record(model, job.tf.input_ids)
        start = _first_open(gate, job.tf.prompt_len)
        kept[b] = _Admitted(
            start,
            gate[start:],
            F.log_softmax(out.logits[0, : job.tf.prompt_len - 1].float(), dim=-1),
            F.log_softmax(out.logits[0, -1].float(), dim=-1) if after_kl else None,
            [o[:, start:] for o in blocks],
            [(k[:, :, :start], v[:, :, :start]) for k, v, *_ in _cache_of(out)],
        )
        deltas[b].update(
            {
                layer: torch.zeros(len(ix), arch.hidden_size, device=device, requires_grad=True)
                for layer, ix in job.index_tensors.items()
            }  # [k_l, hidden] each, fp32 whatever the model dtype
        )
        optimizers[b] = torch.optim.Adam(deltas[b].values(), lr=hp.lr)
        seconds[b] += time.perf_counter() - started

    def assemble(rows: list[int]) -> dict:
        """The model's inputs for these rows: cached positions left-padded to the longest
        cache, the rest right-padded to the longest rest."""
        past = max(kept[b].start for b in rows)
        width = max(lengths[b] - kept[b].start for b in rows)
        ids, mask, positions, gate = [], [], [], []
        for b in rows:
            start, rest = kept[b].start, lengths[b] - kept[b].start
            ids.append(F.pad(jobs[b].tf.input_ids[0, start:], (0, width - rest)))
            ones = torch.ones(start + rest, dtype=torch.long, device=device)
            mask.append(F.pad(ones, (past - start, width - rest)))
            positions.append(torch.arange(start, start + width, device=device))
            gate.append(F.pad(kept[b].gate, (0, width - rest)))
        bank.select(rows, torch.stack(gate)[..., None])  # [B', S', 1]
        prefix.assemble([kept[b].blocks for b in rows], width)
        cache = _left_padded([kept[b].cache for b in rows], past) if past else None
        return {
            "input_ids": torch.stack(ids),  # [B', S']
            "attention_mask": torch.stack(mask),  # [B', past + S']
            "position_ids": torch.stack(positions),  # [B', S']
            "cache": cache,
        }

    queue, active, inputs, step = list(range(len(jobs))), [], None, 0
    with prefix.installed(), bank.hooks():
        while queue or active:
            while queue and len(active) < batch_size:
                active.append(queue.pop(0))
                admit(active[-1])
                inputs = None
            started = time.perf_counter()
            if inputs is None:
                inputs = assemble(active)
            cache = inputs["cache"]
            bank.enabled, prefix.on = True, True
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                **{cache_name: DynamicCache(cache, config=model.config) if cache else None},
                use_cache=cache is not None,
            )
            # one row per job: unbind, as indexing row by row would back-propagate a full-size
            # zero gradient per row
            per_row = F.log_softmax(out.logits.float(), dim=-1).unbind(0)  # B' x [S', vocab]
            losses, going, probs, finished = [], [], [], []
            for logp, b in zip(per_row, active, strict=True):
                tf, start = jobs[b].tf, kept[b].start
                logp = logp[: lengths[b] - start]  # [S_b - start, vocab]
                target_logp = logp[tf.answer_positions.to(device) - start, tf.answer_ids]  # [T]
                min_prob = float(target_logp.detach().min().exp())
                probs.append(min_prob)
                if float(-target_logp.detach().min()) < stop_nll or steps[b] >= hp.max_steps:
                    finished.append((b, min_prob))
                    continue
                going.append(b)
                losses.append(
                    _fine_loss(
                        logp,
                        tf,
                        kept[b].orig_logp,
                        deltas[b],
                        hp,
                        target_logp,
                        start,
                        kept[b].orig_after,
                    )
                )
            if progress is not None:
                progress(step, min(probs))
            if losses:
                for b in going:
                    optimizers[b].zero_grad()
                torch.stack(losses).sum().backward()
                for b in going:
                    optimizers[b].step()
                    steps[b] += 1
            step += 1
            share = (time.perf_counter() - started) / len(active)
            for b in active:
                seconds[b] += share
            for b, min_prob in finished:
                results[b] = Optimised(deltas[b], steps[b], min_prob, seconds[b])
                del kept[b]
                if done is not None:
                    done(b, results[b])
            if going != active:
                active, inputs = going, None
    return results  # type: ignore[return-value]
