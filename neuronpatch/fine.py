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
from .arch import ModelArch, base_model_info, device_of, resolve
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
    prefix = arch.decoder_layers[:first_edited]
    outputs: list = [None] * len(prefix)

    def record(i: int):
        def hook(module, args, output):
            outputs[i] = output

        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(prefix)]
    try:
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
    finally:
        for handle in handles:
            handle.remove()
    for layer, output in zip(prefix, outputs, strict=True):
        layer.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield logits
    finally:
        for layer in prefix:
            del layer.forward


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
    return run_edit(model, tokenizer, request, hparams or FineHparams(), progress, method="fine")


def run_edit(
    model: nn.Module,
    tokenizer,
    request: EditRequest | dict,
    hp: FineHparams,
    progress: Callable[[int, float], None] | None = None,
    *,
    method: str,
    layers: Sequence[int] | None = None,
    gate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    negatives: Callable[[EditRequest], Negatives | None] | None = None,
    gates: tuple = (),
    extra: dict | None = None,
    locator: Callable[..., list[NeuronScore]] | None = None,
) -> Patch:
    """FiNE's locate + optimise, with the hooks the locality-aware variants need.

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
        deltas, steps, min_prob = _optimise(
            model, arch, tf, index_tensors, hp, progress, gate=gate, negatives=negs
        )

    success = min_prob > hp.early_stop_prob
    metrics = {
        "steps": steps,
        "target_prob": round(min_prob, 6),
        "success": success,
        "num_neurons": len(neurons),
    }
    if "SOURCE_DATE_EPOCH" not in os.environ:  # a pinned clock means: no clock readings at all
        metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
    if steps == 0:
        warnings.warn(
            f"the model already predicts {request.target_new!r} for {request.prompt!r} "
            f"(every target token p > {hp.early_stop_prob}); the patch is empty",
            stacklevel=3,
        )
        patch_layers: dict[int, tuple] = {}
        gates = ()
    else:
        if not success:
            warnings.warn(
                f"edit of {request.prompt!r} -> {request.target_new!r} stopped after {steps} steps "
                f"with target probability {min_prob:.3f} < {hp.early_stop_prob}; "
                "try a higher lr or more max_steps",
                stacklevel=3,
            )
        patch_layers = {
            layer: (index_tensors[layer].cpu(), deltas[layer].detach().cpu())
            # every row guarded by the last gate (which may require the earlier ones)
            + ((torch.full((len(groups[layer]),), len(gates) - 1),) if gates else ())
            for layer in groups
        }
    return Patch(
        layers=patch_layers,
        base=base_model_info(model),
        base_fingerprint=fingerprint.compute(arch),
        gates=gates,
        requests=(request.to_dict(),),
        method=method,
        hparams=asdict(hp),
        metrics=metrics,
        extra={"neurons": [asdict(n) for n in neurons], **(extra or {})},
    )


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

    # one batch: the edit sequence in row 0, then the negatives, right-padded to S
    length = tf.input_ids.shape[1]
    input_ids, attention_mask = tf.input_ids, None
    if negatives is not None:
        width = max(length, negatives.input_ids.shape[1])
        input_ids = torch.stack(
            [F.pad(tf.input_ids[0], (0, width - length))]
            + [F.pad(row, (0, width - len(row))) for row in negatives.input_ids.to(device)]
        )  # [1 + N, S]
        attention_mask = torch.stack(
            [F.pad(torch.ones(length, dtype=torch.long, device=device), (0, width - length))]
            + [F.pad(row, (0, width - len(row))) for row in negatives.attention_mask.to(device)]
        )  # [1 + N, S]
        kl_mask = F.pad(negatives.kl_mask.to(device), (0, width - negatives.kl_mask.shape[1]))
    gate_mask = (
        gate(input_ids, attention_mask)[..., None].float() if gate is not None else None
    )  # [B, S, 1]

    positions = tf.answer_positions.to(device)
    prompt_positions = slice(0, tf.prompt_len - 1)  # KL on the prompt but its last position
    stop_nll = -math.log(hp.early_stop_prob)

    steps, min_prob = 0, 0.0
    first_edited = min(index_tensors, default=0)
    with (
        _replayed_prefix(arch, first_edited, input_ids, model, attention_mask) as orig,
        _trainable_deltas(arch, index_tensors, deltas, gate_mask),
    ):
        orig_logp = F.log_softmax(orig[0, prompt_positions].float(), dim=-1)  # [P-1, vocab]
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
            loss_edit = -target_logp.min()
            if float(loss_edit.detach()) < stop_nll or steps >= hp.max_steps:
                break
            new_logp = logp[prompt_positions]  # [P-1, vocab]
            kl = (
                (orig_logp.exp() * (orig_logp - new_logp)).sum(-1).mean()
                if tf.prompt_len > 1
                else logp.new_zeros(())
            )
            p_after = logp[-1, tf.answer_ids].exp()  # [T]: repeating the target
            penalty = -torch.log1p(-p_after.clamp(max=1 - 1e-6)).max()
            norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas.values()]))
            loss = loss_edit + hp.alpha * kl + hp.beta * penalty + hp.gamma * norm
            if negatives is not None and len(neg_orig):
                neg_new = all_logp[1:][kl_mask]  # [M, vocab]
                neg_kl = (neg_orig.exp() * (neg_orig - neg_new)).sum(-1).mean()
                loss = loss + negatives.weight * neg_kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return deltas, steps, min_prob
