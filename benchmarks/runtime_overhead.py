"""Runtime cost of neuronpatch patches on an embedded model (SmolLM2-135M by default), on CPU.

Measures, in one process:

* greedy-generation throughput (tokens/s) unpatched vs with 1, 10, 100 and 1000 stacked
  patches (and the 1000 patches merged into the weights), and with 1, 100 and 1000 stacked
  *gated* patches (each guarded by the default method's two gates, a subject gate on layer 4
  required by a query gate on the middle layer, as method="local" makes them; closed on every
  prompt, plus one configuration whose gates open on the first prompt), at
  batch 1 and batch 8, as ratios to the unpatched speed of the same round. Every round runs
  every configuration once, in a fresh random order, so slow drift of a shared machine hits
  all of them alike; the reported ratio is the median over rounds of (config tokens/s) /
  (unpatched tokens/s of that round).
  A second unpatched configuration ("unpatched (A/A)") measures the noise floor.
* apply and remove times for 1, 10, 100 and 1000 patches (and 1, 100, 1000 gated ones), and
  the cost of applying the N-th patch onto N-1 already applied ones (the layer folds are
  rebuilt on every apply);
* patch file bytes per neuron;
* a per-layer breakdown of the hook cost (gather, matmul, add, Python hook dispatch), and of
  the gated patches' hooks (decoder pre-hook, gate hook, gated folds).

Timings are reported, never asserted. Usage::

    .venv/bin/python benchmarks/runtime_overhead.py            # full run, ~15 min on 2 cores
    .venv/bin/python benchmarks/runtime_overhead.py --quick    # smoke run, ~2 min
    .venv/bin/python benchmarks/runtime_overhead.py --out DIR  # results elsewhere
    .venv/bin/python benchmarks/runtime_overhead.py --model gemma3-270m  # its default's gates

Writes runtime_overhead.json (raw numbers), runtime_overhead.md (tables) and
runtime_overhead.png (slowdown vs stacked patches) to benchmarks/results/ or --out; for another
model than smollm2-135m, runtime_overhead_<family>.* (gemma3-270m: runtime_overhead_gemma3.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# OpenMP threads that spin at barriers (libgomp's default, ACTIVE) turn a machine shared with
# other processes into 10-50x slowdowns of every parallel op: the spinning thread holds the
# core its descheduled partner needs. PASSIVE threads sleep instead, which keeps timings on a
# busy 2-core machine meaningful. It must be set before torch loads libgomp; an explicit
# OMP_WAIT_POLICY in the environment wins (OMP_WAIT_POLICY=ACTIVE for torch's default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import neuronpatch  # noqa: E402
from neuronpatch import fingerprint  # noqa: E402
from neuronpatch.arch import ModelArch, resolve  # noqa: E402
from neuronpatch.local import LocalHparams, make_gates  # noqa: E402
from neuronpatch.patch import Gate  # noqa: E402
from neuronpatch.request import EditRequest  # noqa: E402
from neuronpatch.runtime import _GateState, _state  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
PATCH_COUNTS = (1, 10, 100, 1000)
BATCHES = (1, 8)
NEURONS_PER_PATCH = 20
# neurons are drawn from the layers FiNE may edit: all but its frozen top (smollm2-135m: 0..26)
FROZEN_TOP = LocalHparams().frozen_layers
DELTA_SCALE = 1e-3
TARGETS = {1: 2.0, 1000: 10.0}  # max slowdown % with that many stacked patches
GATED_COUNTS = (1, 100, 1000)
# the default method's gates (LocalHparams()): a subject gate (layer 4, threshold calibrated
# per edit) that a query gate (the middle layer, 0.9, open on the answer's span) requires;
# rows sit above the query gate's layer
OPEN_REQUEST = EditRequest("The capital of France is", "France", "Rome")
GATED_TARGETS = {1: 3.0, 1000: 12.0}  # max slowdown % with that many stacked gated patches
PROMPTS = [
    "The capital of France is",
    "In 1969, the first person to walk on the Moon was",
    "Photosynthesis is the process by which plants",
    "The quick brown fox jumps over the lazy dog because",
    "A good recipe for pancakes needs flour, eggs and",
    "The tallest mountain in the world is located in",
    "Python is a programming language that",
    "When the sun sets over the ocean, the sky turns",
]
UNPATCHED, CONTROL = "unpatched", "unpatched (A/A)"
GATED_OPEN = "1 gated (open)"


# --- configurations ----------------------------------------------------------------------


def gated_name(count: int) -> str:
    return f"{count} gated"


def config_names() -> list[str]:
    return [
        UNPATCHED,
        CONTROL,
        *(str(n) for n in PATCH_COUNTS),
        "1000 merged",
        *(gated_name(n) for n in GATED_COUNTS),
        GATED_OPEN,
    ]


def targets() -> dict[str, float]:
    """Max slowdown % per configuration: TARGETS, and GATED_TARGETS for closed and open gates."""
    limits = {str(n): limit for n, limit in TARGETS.items()}
    limits |= {gated_name(n): limit for n, limit in GATED_TARGETS.items()}
    limits[GATED_OPEN] = GATED_TARGETS[1]
    return limits


def describe(config: str) -> str:
    """A configuration in words: '1000 gated' -> '1000 gated patches'."""
    words = config.split()
    count, kind = int(words[0]), [w for w in words[1:] if w != "(open)"]
    noun = "patch" if count == 1 else "patches"
    return " ".join([str(count), *kind, noun]) + (", gate open" if config == GATED_OPEN else "")


@dataclass
class PatchSets:
    """The benchmark's patches: ungated ones, gated ones (gates closed on every prompt), and
    one gated patch whose gate opens on PROMPTS[0]."""

    ungated: list[neuronpatch.Patch]
    gated: list[neuronpatch.Patch]
    gated_open: neuronpatch.Patch

    def for_config(self, name: str) -> list[neuronpatch.Patch]:
        """The patches configuration ``name`` applies (before merging, for "1000 merged")."""
        if name in (UNPATCHED, CONTROL):
            return []
        if name == GATED_OPEN:
            return [self.gated_open]
        count = int(name.split()[0])
        return (self.gated if name == gated_name(count) else self.ungated)[:count]


def _base(arch: ModelArch, name: str) -> neuronpatch.BaseModelInfo:
    return neuronpatch.BaseModelInfo(
        name, arch.model_type, arch.num_layers, arch.hidden_size, arch.intermediate_size
    )


def _random_rows(
    arch: ModelArch, g: torch.Generator, lowest: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """20 random (layer, neuron) pairs in layers lowest..top with small random deltas."""
    top = patch_layers(arch)
    layers = torch.randint(lowest, top, (NEURONS_PER_PATCH,), generator=g).tolist()
    return {
        layer: (
            torch.randperm(arch.intermediate_size, generator=g)[:k],  # [k]
            torch.randn(k, arch.hidden_size, generator=g) * DELTA_SCALE,  # [k, hidden]
        )
        for layer, k in sorted(Counter(layers).items())
    }


def patch_layers(arch: ModelArch) -> int:
    """Neurons are drawn from layers below this one."""
    return arch.num_layers - FROZEN_TOP


def outputs_stem(model: str) -> str:
    """'runtime_overhead' for smollm2-135m (the first results), else with the model family."""
    return (
        "runtime_overhead" if model == DEFAULT_MODEL else f"runtime_overhead_{model.split('-')[0]}"
    )


def make_patches(arch: ModelArch, count: int, name: str) -> list[neuronpatch.Patch]:
    """``count`` distinct patches of 20 random (layer, neuron) pairs in all but the top layers."""
    base, fp = _base(arch, name), fingerprint.compute(arch)
    return [
        neuronpatch.Patch(
            _random_rows(arch, torch.Generator().manual_seed(10_000 + seed), 0),
            base,
            base_fingerprint=fp,
            method="benchmark",
        )
        for seed in range(count)
    ]


def make_gated_patch(
    arch: ModelArch,
    seed: int,
    base: neuronpatch.BaseModelInfo,
    fp: torch.Tensor,
    gates: tuple[Gate, ...],
    random_keys: bool = True,
) -> neuronpatch.Patch:
    """A patch as method="local" makes one: 20 random neurons above the last of ``gates``
    (the default's subject and query gates), every row guarded by it. With ``random_keys``
    each gate gets a random unit key (same layer, centre, threshold): such gates never open."""
    g = torch.Generator().manual_seed(20_000 + seed)
    if random_keys:
        gates = tuple(
            replace(gate, key=(key := torch.randn(arch.hidden_size, generator=g)) / key.norm())
            for gate in gates
        )
    rows = _random_rows(arch, g, gates[-1].layer + 1)
    guard = len(gates) - 1
    return neuronpatch.Patch(
        {
            layer: (idx, deltas, torch.full((len(idx),), guard, dtype=torch.int64))
            for layer, (idx, deltas) in rows.items()
        },
        base,
        base_fingerprint=fp,
        gates=gates,
        method="benchmark",
    )


def open_gates(model, tokenizer) -> tuple[Gate, ...]:
    """The default method's gates for OPEN_REQUEST: open on PROMPTS[0] (its prompt)."""
    with torch.inference_mode():
        return make_gates(model, tokenizer, OPEN_REQUEST, LocalHparams())


def make_patch_sets(model, tokenizer, arch: ModelArch) -> PatchSets:
    name = model.config.name_or_path
    base, fp = _base(arch, name), fingerprint.compute(arch)
    gates = open_gates(model, tokenizer)
    # a random key's cosine with any centred residual is ~N(0, 1/hidden): these never open
    gated = [make_gated_patch(arch, s, base, fp, gates) for s in range(max(GATED_COUNTS))]
    return PatchSets(
        make_patches(arch, max(PATCH_COUNTS), name),
        gated,
        make_gated_patch(arch, -1, base, fp, gates, random_keys=False),
    )


def describe_gates(gates: tuple[Gate, ...]) -> str:
    """'subject gate on layer 4 (> 0.52), query gate on layer 15 (> 0.9) requiring gate 0, span 2'."""
    return ", ".join(
        f"{g.kind} gate on layer {g.layer} (> {g.threshold:.3g})"
        + (f" requiring gate {g.requires}" if g.requires is not None else "")
        + (f", span {g.span}" if g.span is not None else "")
        for g in gates
    )


def set_config(model, sets: PatchSets, name: str) -> None:
    """Bring ``model`` into configuration ``name`` from whatever state it is in."""
    if neuronpatch.is_merged(model):
        neuronpatch.unmerge(model)
    neuronpatch.remove(model)
    patches = sets.for_config(name)
    if patches:
        neuronpatch.apply(model, patches)
    if name.endswith("merged"):
        neuronpatch.merge(model)


def gates_open(model) -> float | None:
    """Fraction of (sequence, gate) pairs open at the last position of the last forward pass
    (None without gates): checks that the "closed" gates stay closed and the open one opens."""
    state = _state(model)
    gates = state.gates if state is not None else None
    if gates is None or gates.open is None:
        return None
    return float(gates.open[:, -1].float().mean())


# --- generation throughput ---------------------------------------------------------------


def encode(tokenizer, batch: int) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return dict(tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True))


def generate_once(
    model, inputs: dict[str, torch.Tensor], new_tokens: int
) -> tuple[float, float, int]:
    """Wall and process-CPU seconds of one greedy generation, and the tokens it generated."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return seconds, cpu_seconds, int(generated)


def throughput(
    model,
    tokenizer,
    sets: PatchSets,
    repeats: int,
    new_tokens: int,
    warmup: int,
    budget_s: float,
    log: Callable,
) -> dict[str, Any]:
    """Tokens/s of every configuration at every batch size, ``repeats`` interleaved rounds.

    Rounds stop early once ``budget_s`` seconds have passed (after at least three rounds),
    so a machine slowed down by other load still finishes in bounded time.
    """
    inputs = {b: encode(tokenizer, b) for b in BATCHES}
    names = config_names()
    log(f"warm-up ({warmup} generations per batch size and configuration kind)")
    for name in (UNPATCHED, "1000", "1000 merged", gated_name(max(GATED_COUNTS))):
        set_config(model, sets, name)
        for _ in range(warmup):
            for b in BATCHES:
                generate_once(model, inputs[b], new_tokens)

    rng = random.Random(0)
    runs: list[dict[str, Any]] = []  # every timed generation, in the order it ran
    started = time.perf_counter()
    rounds = 0
    for r in range(repeats):
        if r >= min(3, repeats) and time.perf_counter() - started > budget_s:
            log(f"time budget of {budget_s:.0f} s spent: stopping after {r} rounds")
            break
        rounds = r + 1
        order = names[:]
        rng.shuffle(order)
        batches = list(BATCHES) if r % 2 == 0 else list(reversed(BATCHES))
        for name in order:
            set_config(model, sets, name)
            for b in batches:
                seconds, cpu_seconds, generated = generate_once(model, inputs[b], new_tokens)
                runs.append(
                    dict(
                        round=r,
                        config=name,
                        batch=b,
                        seconds=seconds,
                        cpu_seconds=cpu_seconds,
                        tokens=generated,
                        tokens_per_s=generated / seconds,
                        gates_open=gates_open(model),
                    )
                )
        summary = ", ".join(
            f"{x['config']}/b{x['batch']}={x['tokens_per_s']:.1f}" for x in runs if x["round"] == r
        )
        log(f"round {r + 1}/{repeats}: {summary}")
    set_config(model, sets, UNPATCHED)

    results: dict[str, Any] = {}
    for b in BATCHES:
        per_round_base = {
            x["round"]: x["tokens_per_s"]
            for x in runs
            if x["batch"] == b and x["config"] == UNPATCHED
        }
        base_median = statistics.median(per_round_base.values())
        rows = {}
        for name in names:
            mine = [x for x in runs if x["batch"] == b and x["config"] == name]
            tps = [x["tokens_per_s"] for x in mine]
            paired = [x["tokens_per_s"] / per_round_base[x["round"]] for x in mine]
            ratio = statistics.median(paired)
            opened = [x["gates_open"] for x in mine if x["gates_open"] is not None]
            rows[name] = dict(
                tokens_per_s=tps,
                tokens_per_s_median=statistics.median(tps),
                paired_ratios=paired,
                ratio=ratio,  # median over rounds of the paired ratio
                ratio_q25=_quantile(paired, 0.25),
                ratio_q75=_quantile(paired, 0.75),
                ratio_of_medians=statistics.median(tps) / base_median,
                slowdown_pct=(1 - ratio) * 100,
                gates_open=statistics.mean(opened) if opened else None,
            )
        results[str(b)] = rows
    return dict(
        new_tokens=new_tokens,
        repeats=rounds,
        repeats_requested=repeats,
        budget_s=budget_s,
        warmup=warmup,
        runs=runs,
        batches=results,
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- apply / remove ----------------------------------------------------------------------


def apply_remove(model, sets: PatchSets, repeats: int, log: Callable) -> dict[str, Any]:
    """Apply/remove times of the ungated (keyed "1".."1000") and gated ("1 gated"..) series."""
    set_config(model, sets, UNPATCHED)
    series = [(str(n), sets.ungated[:n]) for n in PATCH_COUNTS]
    series += [(gated_name(n), sets.gated[:n]) for n in GATED_COUNTS]
    bulk: dict[str, dict[str, list[float]]] = {}
    for name, patches in series:
        applies, removes = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            neuronpatch.apply(model, patches)
            applies.append(time.perf_counter() - start)
            start = time.perf_counter()
            neuronpatch.remove(model)
            removes.append(time.perf_counter() - start)
        bulk[name] = dict(apply_s=applies, remove_s=removes)
        log(
            f"apply {describe(name)} in one call: {statistics.median(applies) * 1e3:.1f} ms, "
            f"remove all: {statistics.median(removes) * 1e3:.1f} ms"
        )

    incremental: dict[str, dict[str, list[float]]] = {}
    for name, patches in series:
        applies, removes = [], []
        for _ in range(repeats):
            if len(patches) > 1:
                neuronpatch.apply(model, patches[:-1])
            start = time.perf_counter()
            neuronpatch.apply(model, patches[-1])
            applies.append(time.perf_counter() - start)
            start = time.perf_counter()
            neuronpatch.remove(model, patches[-1])
            removes.append(time.perf_counter() - start)
            neuronpatch.remove(model)
        incremental[name] = dict(apply_s=applies, remove_s=removes)
        log(
            f"apply patch #{len(patches)} of {describe(name)} onto the others: "
            f"{statistics.median(applies) * 1e3:.1f} ms, "
            f"remove it again: {statistics.median(removes) * 1e3:.1f} ms"
        )
    return dict(repeats=repeats, bulk=bulk, nth=incremental)


# --- file size ---------------------------------------------------------------------------


def file_size(patch: neuronpatch.Patch, arch: ModelArch) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = patch.save(Path(tmp) / "patch.safetensors")
        data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    neurons = patch.num_neurons
    delta_bytes = sum(ld.deltas.numel() * ld.deltas.element_size() for ld in patch.layers.values())
    index_bytes = sum(
        ld.neuron_indices.numel() * ld.neuron_indices.element_size() for ld in patch.layers.values()
    )
    fp = patch.base_fingerprint
    fp_bytes = fp.numel() * fp.element_size() if fp is not None else 0
    gate_bytes = sum(g.key.nbytes + g.centre.nbytes for g in patch.gates)
    gate_id_bytes = sum(
        ld.gate_ids.nbytes for ld in patch.layers.values() if ld.gate_ids is not None
    )
    return dict(
        neurons=neurons,
        layers=len(patch.layers),
        hidden_size=arch.hidden_size,
        delta_dtype=str(next(iter(patch.layers.values())).deltas.dtype),
        file_bytes=len(data),
        bytes_per_neuron=len(data) / neurons,
        raw_delta_bytes=delta_bytes,
        raw_delta_bytes_per_neuron=delta_bytes / neurons,
        overhead_bytes=len(data) - delta_bytes,
        overhead_breakdown=dict(
            length_prefix=8,
            json_header=header,
            neuron_indices=index_bytes,
            base_fingerprint=fp_bytes,
            gate_keys_and_centres=gate_bytes,
            gate_ids=gate_id_bytes,
        ),
    )


# --- per-layer hook cost -----------------------------------------------------------------


def _interleaved_min(
    fns: dict[str, Callable[[], Any]], iters: int, repeats: int
) -> dict[str, float]:
    """Seconds per call of each function: the fastest of ``repeats`` loops of ``iters`` calls.

    The functions take turns within every repeat, so a burst of load from other processes
    hits them alike; the minimum discards such bursts (they only ever add time).
    """
    for fn in fns.values():
        for _ in range(max(1, iters // 10)):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / iters)
    return best


@dataclass
class _HookCase:
    """One hooked layer: W_out, its neuronpatch hook, and the tensors of one decode step."""

    module: torch.nn.Module  # W_out
    hook: Callable  # the neuronpatch forward hook registered on it
    q: torch.Tensor  # [b, 1, intermediate]  W_out's input
    idx: torch.Tensor  # [n]  folded neuron indices
    deltas: torch.Tensor  # [n, hidden]  folded deltas
    base: torch.Tensor  # [b, 1, hidden]  W_out's output
    picked: torch.Tensor  # [b, 1, n]  q[..., idx]
    extra: torch.Tensor  # [b, 1, hidden]  picked @ deltas

    @classmethod
    def build(cls, arch: ModelArch, state, layer: int, batch: int, g: torch.Generator):
        module, fold = arch.w_out[layer], state.folds[layer]
        hook = module._forward_hooks[state.hooks[layer].id]
        q = torch.randn(batch, 1, arch.intermediate_size, generator=g)
        picked = q[..., fold.neuron_indices]
        return cls(
            module,
            hook,
            q,
            fold.neuron_indices,
            fold.deltas,
            module.forward(q),
            picked,
            picked @ fold.deltas,
        )


def _hook_ops(cases: list[_HookCase]) -> dict[str, Callable[[], Any]]:
    """Each timed operation, run once for every hooked layer (one decode step's worth).

    ``dispatch`` vs ``plain`` is nn.Module's forward-hook machinery alone: an Identity with a
    hook that does nothing, vs without hooks (nn.Module takes a fast path when there are none).
    """
    plain = torch.nn.Identity()
    hooked = torch.nn.Identity()
    hooked.register_forward_hook(lambda mod, args, output: None)
    return {
        "w_out": lambda: [c.module.forward(c.q) for c in cases],
        "hook_fn": lambda: [c.hook(c.module, (c.q,), c.base) for c in cases],
        "gather": lambda: [c.q[..., c.idx] for c in cases],
        "matmul": lambda: [c.picked @ c.deltas for c in cases],
        "add": lambda: [c.base + c.extra for c in cases],
        "plain": lambda: [plain(c.q) for c in cases],
        "dispatch": lambda: [hooked(c.q) for c in cases],
    }


def hook_breakdown(
    model, sets: PatchSets, iters: int, repeats: int, log: Callable
) -> dict[str, Any]:
    """What the hooks add to one decode step (one new position per sequence), all layers.

    Measured directly rather than as (W_out with hook) - (W_out without), a small difference
    of two large, noisy numbers: the hook's cost is nn.Module's hook dispatch plus the hook
    function itself (called directly on one decode step's tensors); the hook function is split
    into its three tensor ops, each timed alone, gather ``q[..., idx]``, matmul ``@ deltas``
    and the add, and the rest (the closure's Python).
    """
    arch = resolve(model)
    out: dict[str, Any] = {}
    for n in PATCH_COUNTS:
        set_config(model, sets, str(n))
        state = _state(model)
        for b in BATCHES:
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                cases = [_HookCase.build(arch, state, layer, b, g) for layer in sorted(state.folds)]
                t = _interleaved_min(_hook_ops(cases), iters, repeats)
            sizes = [len(c.idx) for c in cases]
            kernels = t["gather"] + t["matmul"] + t["add"]
            dispatch = t["dispatch"] - t["plain"]
            row = dict(
                patches=n,
                batch=b,
                hooked_layers=len(cases),
                neurons_per_layer_mean=statistics.mean(sizes),
                neurons_per_layer_max=max(sizes),
                w_out_forward_us=t["w_out"] * 1e6,
                hook_total_us=(t["hook_fn"] + dispatch) * 1e6,
                hook_fn_us=t["hook_fn"] * 1e6,
                gather_us=t["gather"] * 1e6,
                matmul_us=t["matmul"] * 1e6,
                add_us=t["add"] * 1e6,
                closure_python_us=(t["hook_fn"] - kernels) * 1e6,
                hook_dispatch_us=dispatch * 1e6,
                raw_us={k: v * 1e6 for k, v in t.items()},
            )
            out[f"{n}/{b}"] = row
            log(
                f"hook cost per decode step, {n} patches, batch {b}: "
                f"{row['hook_total_us']:.0f} us over {len(cases)} layers "
                f"(gather {row['gather_us']:.0f}, matmul {row['matmul_us']:.0f}, "
                f"add {row['add_us']:.0f}, closure Python {row['closure_python_us']:.0f}, "
                f"hook dispatch {row['hook_dispatch_us']:.0f}); "
                f"W_out itself {row['w_out_forward_us']:.0f} us"
            )
    set_config(model, sets, UNPATCHED)
    return out


def _registered(handle) -> Callable:
    """The hook function a RemovableHandle stands for."""
    return handle.hooks_dict_ref()[handle.id]


def _gated_hook_ops(
    model, arch: ModelArch, state, batch: int, g: torch.Generator
) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """One decode step's gated hooks, each called directly: the decoder pre-hook (a KV-cache
    step of a batch of prompts), the gate hooks on the residual, every hooked layer's W_out
    hook (its gated fold; the gated patches have no ungated rows). Also the hook counts."""
    gates: _GateState = state.gates
    decoder_hooks = arch.decoder._forward_pre_hooks if arch.decoder is not None else None
    pre_hooks = [_registered(h) for h in gates.hooks if h.hooks_dict_ref() is decoder_hooks]
    gate_hooks = [
        (block, _registered(h))
        for block in arch.decoder_layers
        for h in gates.hooks
        if h.hooks_dict_ref() is block._forward_hooks
    ]
    ids = torch.randint(0, 1000, (batch, 8), generator=g)
    out = model(input_ids=ids, use_cache=True)
    # a real, non-empty cache, under the name this transformers version passes the decoder
    name = "cache" if "cache" in out else "past_key_values"
    kwargs = {name: out[name], "attention_mask": torch.ones(batch, 9, dtype=torch.long)}
    h = torch.randn(batch, 1, arch.hidden_size, generator=g)  # [b, 1, hidden] residual
    rows = []
    for layer in sorted(state.hooks):
        module = arch.w_out[layer]
        q = torch.randn(batch, 1, arch.intermediate_size, generator=g)  # [b, 1, intermediate]
        rows.append((module, _registered(state.hooks[layer]), q, module.forward(q)))

    def pre() -> None:
        for fn in pre_hooks:
            fn(arch.decoder, (), kwargs)

    def gates_step() -> None:  # pre-hook, then the gate hooks, as in a forward pass
        pre()
        for block, fn in gate_hooks:
            fn(block, (h,), h)

    hooks = len(pre_hooks) + len(gate_hooks) + len(rows)
    plain = torch.nn.Identity()
    hooked = torch.nn.Identity()
    hooked.register_forward_hook(lambda mod, args, output: None)
    ops = {
        "pre_hook": pre,
        "gates": gates_step,
        "rows": lambda: [fn(m, (q,), base) for m, fn, q, base in rows],
        "plain": lambda: [plain(h) for _ in range(hooks)],
        "dispatch": lambda: [hooked(h) for _ in range(hooks)],
    }
    return ops, dict(pre_hooks=len(pre_hooks), gate_hooks=len(gate_hooks), row_hooks=len(rows))


def gated_hook_breakdown(
    model, sets: PatchSets, iters: int, repeats: int, log: Callable
) -> dict[str, Any]:
    """What gated patches' hooks add to one decode step (one new position per sequence).

    The decoder pre-hook (new sequence or KV-cache step?), the gate hooks (every
    gate's cosine and the causal "seen" state), and the gated fold of every hooked layer,
    ``(q[..., idx] * open[..., col]) @ D``, plus nn.Module's dispatch of all those hooks.
    Open and closed gates cost the same: the rows are computed and multiplied by 1 or 0.
    """
    arch = resolve(model)
    out: dict[str, Any] = {}
    for n in GATED_COUNTS:
        set_config(model, sets, gated_name(n))
        state = _state(model)
        for b in BATCHES:
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                ops, counts = _gated_hook_ops(model, arch, state, b, g)
                t = _interleaved_min(ops, iters, repeats)
            sizes = [len(f.neuron_indices) for f in state.gated.values()]
            dispatch = t["dispatch"] - t["plain"]
            row = dict(
                patches=n,
                batch=b,
                gates=state.gates.count,
                hooked_layers=len(state.gated),
                gated_rows_per_layer_mean=statistics.mean(sizes),
                **counts,
                pre_hook_us=t["pre_hook"] * 1e6,
                gate_hook_us=(t["gates"] - t["pre_hook"]) * 1e6,
                rows_us=t["rows"] * 1e6,
                hook_dispatch_us=dispatch * 1e6,
                hook_total_us=(t["gates"] + t["rows"] + dispatch) * 1e6,
                raw_us={k: v * 1e6 for k, v in t.items()},
            )
            out[f"{n}/{b}"] = row
            log(
                f"gated hook cost per decode step, {describe(gated_name(n))}, batch {b}: "
                f"{row['hook_total_us']:.0f} us (decoder pre-hook {row['pre_hook_us']:.0f}, "
                f"gate hook {row['gate_hook_us']:.0f}, gated folds {row['rows_us']:.0f} over "
                f"{len(sizes)} layers, hook dispatch {row['hook_dispatch_us']:.0f})"
            )
    set_config(model, sets, UNPATCHED)
    return out


# --- reports -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return dict(
        date=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        cpu_model=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        torch=torch.__version__,
        transformers=transformers.__version__,
        neuronpatch=neuronpatch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
    )


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def predicted_slowdown(results: dict[str, Any], config: str, batch: int) -> float:
    """The slowdown % the microbenchmarked hook cost implies: hook time / unpatched step time.

    ``config``: "1000" (ungated), "1000 gated" or GATED_OPEN (costs what "1 gated" does).
    """
    tps = results["throughput"]["batches"][str(batch)][UNPATCHED]["tokens_per_s_median"]
    step_us = batch / tps * 1e6  # one decode step generates one token per sequence
    count = int(config.split()[0])
    table = "gated_hook_breakdown" if "gated" in config else "hook_breakdown"
    return results[table][f"{count}/{batch}"]["hook_total_us"] / step_us * 100


def assess_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target checked two ways: the end-to-end slowdown (against this run's A/A noise
    floor) and the slowdown the per-step hook microbenchmark predicts."""
    tp = results["throughput"]["batches"]
    checks = []
    for config, limit in targets().items():
        for b in BATCHES:
            slow = tp[str(b)][config]["slowdown_pct"]
            control = tp[str(b)][CONTROL]
            noise = max(  # how far two identical configurations land apart in this run
                abs(control["slowdown_pct"]), (control["ratio_q75"] - control["ratio_q25"]) * 50
            )
            if slow <= limit:
                measured = "met"
            elif slow <= limit + noise:
                measured = "within noise"
            else:
                measured = "NOT met"
            predicted = predicted_slowdown(results, config, b)
            checks.append(
                dict(
                    config=config,
                    patches=int(config.split()[0]),
                    gated="gated" in config,
                    batch=b,
                    limit_pct=limit,
                    measured_slowdown_pct=slow,
                    noise_floor_pct=noise,
                    measured=measured,
                    predicted_slowdown_pct=predicted,
                    predicted="met" if predicted <= limit else "NOT met",
                )
            )
    verdicts = {c["measured"] for c in checks}
    overall = (
        "NOT met" if "NOT met" in verdicts else "met" if verdicts == {"met"} else "inconclusive"
    )
    predicted_overall = "met" if all(c["predicted"] == "met" for c in checks) else "NOT met"
    return dict(checks=checks, measured=overall, predicted=predicted_overall)


def _target_lines(checked: dict[str, Any]) -> list[str]:
    lines = []
    for c in checked["checks"]:
        lines.append(
            f"{describe(c['config'])}, batch {c['batch']}: "
            f"measured {c['measured_slowdown_pct']:+.1f} % (A/A noise {c['noise_floor_pct']:.1f} "
            f"%): {c['measured']}; microbenchmark predicts {c['predicted_slowdown_pct']:+.1f} %: "
            f"{c['predicted']} (target <= {c['limit_pct']:g} %)"
        )
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    tp, ar, size, hooks = (
        results["throughput"],
        results["apply_remove"],
        results["file_size"],
        results["hook_breakdown"],
    )
    info = results["machine"]
    lines = [
        "# neuronpatch runtime overhead",
        "",
        f"Model `{results['model']}` (fp32), {info['cpu_model']}, {info['torch_threads']} torch "
        f"threads (OMP_WAIT_POLICY={info['omp_wait_policy']}), torch {info['torch']}, transformers {info['transformers']}, {info['date']}"
        f"{' (quick run)' if results['quick'] else ''}.",
        f"Load average before/after: `{results['loadavg_start']}` / `{results['loadavg_end']}`.",
        "",
        f"Greedy generation of {tp['new_tokens']} new tokens per sequence; each patch has "
        f"{NEURONS_PER_PATCH} random neurons in layers {results['setup']['patch_layers']}. A gated patch "
        f'(as method="local" makes one) has {NEURONS_PER_PATCH} random neurons in layers '
        f"{results['setup']['gated_patch_layers']}, all guarded by the default method's gates: "
        f"{results['setup']['gates']}; `N gated` patches have random keys, so their gates stay "
        f"closed on every prompt, and `{GATED_OPEN}`'s gates are the default's for "
        f"{OPEN_REQUEST.prompt!r} (subject {OPEN_REQUEST.subject!r}), the first prompt, so "
        "they open there (on 1 of 8 sequences at batch 8). `gates open` = fraction of "
        "(sequence, gate) pairs open at the end of generation. "
        f"{tp['repeats']} rounds (of {tp['repeats_requested']} requested), each running every "
        "configuration once in a random order. "
        "Ratio = median over rounds of tokens/s divided by the same round's unpatched "
        "tokens/s (IQR in brackets); slowdown = 1 - ratio. `unpatched (A/A)` is a second "
        "unpatched configuration: its slowdown is the noise floor of this run.",
        "",
        "## Generation throughput",
        "",
        "| patches | batch | tokens/s (median) | ratio [IQR] | slowdown % | gates open |",
        "|---|---|---|---|---|---|",
    ]
    for name in config_names():
        for b in BATCHES:
            row = tp["batches"][str(b)][name]
            opened = row.get("gates_open")
            lines.append(
                f"| {name} | {b} | {row['tokens_per_s_median']:.1f} | {row['ratio']:.3f} "
                f"[{row['ratio_q25']:.3f}, {row['ratio_q75']:.3f}] | "
                f"{row['slowdown_pct']:+.1f} | {'' if opened is None else f'{opened:.0%}'} |"
            )
    checked = results["targets"]
    goals = ", ".join(f"<= {limit:g} % with {describe(c)}" for c, limit in targets().items())
    lines += [
        "",
        f"**Targets: {goals}. "
        f"End-to-end: {checked['measured']}; per the hook microbenchmark: "
        f"{checked['predicted']}.** A measured slowdown above the target but within the "
        "A/A noise floor (the larger of the A/A median slowdown and half its IQR) counts as "
        "'within noise'.",
        "",
        *(f"- {line}" for line in _target_lines(checked)),
        "",
        "## Apply / remove",
        "",
        f"In-memory Patch objects; median of {ar['repeats']} repeats.",
        "",
        "| patches | apply all in one call (ms) | remove all (ms) | apply the N-th onto N-1 (ms) "
        "| remove that one (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, bulk in ar["bulk"].items():
        nth = ar["nth"][name]
        lines.append(
            f"| {name} | {statistics.median(bulk['apply_s']) * 1e3:.1f} | "
            f"{statistics.median(bulk['remove_s']) * 1e3:.1f} | "
            f"{statistics.median(nth['apply_s']) * 1e3:.1f} | "
            f"{statistics.median(nth['remove_s']) * 1e3:.1f} |"
        )
    br = size["overhead_breakdown"]
    lines += [
        "",
        "## Patch file size",
        "",
        f"A {size['neurons']}-neuron patch ({size['layers']} layers, {size['delta_dtype']} "
        f"deltas of width {size['hidden_size']}): {size['file_bytes']} bytes = "
        f"**{size['bytes_per_neuron']:.0f} bytes per neuron** (raw deltas "
        f"{size['raw_delta_bytes_per_neuron']:.0f} bytes per neuron). Overhead over the raw "
        f"deltas: {size['overhead_bytes']} bytes ({br['json_header']} JSON header, "
        f"{br['neuron_indices']} neuron indices, {br['base_fingerprint']} base fingerprint, "
        f"{br['length_prefix']} length prefix).",
        "",
        _gated_size_line(results["file_size_gated"]),
        "",
        "## Hook cost per decode step (microbenchmark)",
        "",
        "Per generated token (one position per sequence), summed over the hooked layers, "
        "fastest of several interleaved loops: the hook's total cost = nn.Module hook dispatch "
        "+ the hook function, which is split into gather `q[..., idx]`, matmul `@ deltas`, the "
        "add, and the closure's own Python. `W_out` (the down-projection itself, no hook) is "
        "given for scale.",
        "",
        "| patches | batch | layers | neurons/layer | W_out us | hook total us | gather us "
        "| matmul us | add us | closure Python us | hook dispatch us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in hooks.values():
        lines.append(
            f"| {row['patches']} | {row['batch']} | {row['hooked_layers']} | "
            f"{row['neurons_per_layer_mean']:.0f} | {row['w_out_forward_us']:.0f} | "
            f"{row['hook_total_us']:.0f} | {row['gather_us']:.0f} | {row['matmul_us']:.0f} | "
            f"{row['add_us']:.0f} | {row['closure_python_us']:.0f} | "
            f"{row['hook_dispatch_us']:.0f} |"
        )
    lines += [
        "",
        "Gated patches' hooks per decode step: the decoder pre-hook (does this forward start a "
        "new sequence?), the gate hook on the gate layer (all gates' cosines and the causal "
        "'seen' state) and the gated fold of every hooked layer, "
        "`(q[..., idx] * open[..., col]) @ D`, which costs the same with gates open or closed. "
        "`ungated us` is the hook total of as many ungated patches, for comparison.",
        "",
        "| gated patches | batch | gates | layers | rows/layer | pre-hook us | gate hook us "
        "| gated folds us | hook dispatch us | hook total us | ungated us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["gated_hook_breakdown"].items():
        lines.append(
            f"| {row['patches']} | {row['batch']} | {row['gates']} | {row['hooked_layers']} | "
            f"{row['gated_rows_per_layer_mean']:.0f} | {row['pre_hook_us']:.0f} | "
            f"{row['gate_hook_us']:.0f} | {row['rows_us']:.0f} | "
            f"{row['hook_dispatch_us']:.0f} | {row['hook_total_us']:.0f} | "
            f"{hooks[key]['hook_total_us']:.0f} |"
        )
    for b in BATCHES:
        tps = tp["batches"][str(b)][UNPATCHED]["tokens_per_s_median"]
        lines.append("")
        lines.append(
            f"Batch {b}: an unpatched decode step takes ~{b / tps * 1e3:.1f} ms, so the measured "
            "hook cost predicts a slowdown of "
            + ", ".join(
                f"{predicted_slowdown(results, str(n), b):.1f} % with {n}" for n in PATCH_COUNTS
            )
            + " patches; "
            + ", ".join(
                f"{predicted_slowdown(results, gated_name(n), b):.1f} % with {n}"
                for n in GATED_COUNTS
            )
            + " gated patches."
        )
    path.write_text("\n".join(lines) + "\n")


def _gated_size_line(size: dict[str, Any]) -> str:
    br = size["overhead_breakdown"]
    return (
        f"A gated {size['neurons']}-neuron patch ({size['layers']} layers, one gate): "
        f"{size['file_bytes']} bytes = **{size['bytes_per_neuron']:.0f} bytes per neuron**; "
        f"the gate adds {br['gate_keys_and_centres']} bytes of key and centre and "
        f"{br['gate_ids']} bytes of gate_ids (JSON header {br['json_header']} bytes)."
    )


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = results["throughput"]["batches"]
    fig, ax = plt.subplots(figsize=(7, 5.8))
    for b, color in zip(BATCHES, ("tab:blue", "tab:orange"), strict=False):
        rows = [tp[str(b)][str(n)] for n in PATCH_COUNTS]
        slow = [r["slowdown_pct"] for r in rows]
        lo = [s - (1 - r["ratio_q75"]) * 100 for s, r in zip(slow, rows, strict=True)]
        hi = [(1 - r["ratio_q25"]) * 100 - s for s, r in zip(slow, rows, strict=True)]
        ax.errorbar(
            PATCH_COUNTS,
            slow,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            color=color,
            label=f"batch {b} (bars: IQR over rounds)",
        )
        predicted = [predicted_slowdown(results, str(n), b) for n in PATCH_COUNTS]
        ax.plot(PATCH_COUNTS, predicted, color=color, ls="-.", lw=1, marker=".")
        merged = tp[str(b)]["1000 merged"]["slowdown_pct"]
        ax.plot([max(PATCH_COUNTS)], [merged], marker="x", ms=9, ls="none", color=color)
        gated = [tp[str(b)][gated_name(n)]["slowdown_pct"] for n in GATED_COUNTS]
        ax.plot(GATED_COUNTS, gated, color=color, ls="--", lw=1, marker="s", ms=4)
        predicted = [predicted_slowdown(results, gated_name(n), b) for n in GATED_COUNTS]
        ax.plot(GATED_COUNTS, predicted, color=color, ls=(0, (1, 3)), lw=1, marker=".")
        opened = tp[str(b)][GATED_OPEN]["slowdown_pct"]
        ax.plot([1], [opened], marker="^", ms=7, ls="none", color=color)
        noise = tp[str(b)][CONTROL]["slowdown_pct"]
        ax.axhline(noise, color=color, lw=0.8, alpha=0.5, ls=":")
    ax.plot([], [], color="grey", ls=":", lw=0.8, label="A/A noise floor (per batch)")
    ax.plot([], [], color="grey", marker="x", ls="none", label="1000 patches merged")
    ax.plot(
        [], [], color="grey", ls="-.", lw=1, marker=".", label="predicted by hook microbenchmark"
    )
    ax.plot([], [], color="grey", ls="--", lw=1, marker="s", ms=4, label="gated (gates closed)")
    ax.plot([], [], color="grey", ls=(0, (1, 3)), lw=1, marker=".", label="gated, predicted")
    ax.plot([], [], color="grey", marker="^", ls="none", label=f"{GATED_OPEN}")
    for count, limit in TARGETS.items():
        ax.axhline(limit, color="red" if count == 1 else "darkred", ls="--", lw=1)
        ax.annotate(
            f"target: <= {limit:g} % at {describe(str(count))}",
            (count, limit),
            textcoords="offset points",
            xytext=(0, 3),
            ha="left" if count == min(TARGETS) else "right",
            fontsize=8,
            color="darkred",
        )
    for count, limit in GATED_TARGETS.items():  # labelled mid-plot, clear of the ones above
        ax.axhline(limit, color="red" if count == 1 else "darkred", ls=":", lw=1)
        ax.annotate(
            f"target: <= {limit:g} % at {describe(gated_name(count))}",
            (30, limit),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
            color="darkred",
        )
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_xticks(PATCH_COUNTS, [str(n) for n in PATCH_COUNTS])
    ax.set_xlabel(f"stacked patches ({NEURONS_PER_PATCH} neurons each)")
    ax.set_ylabel("slowdown vs unpatched (%)")
    ax.set_title(f"neuronpatch hook overhead, {results['model']}, CPU greedy generation")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model name (default {DEFAULT_MODEL}); gated patches get its default gates",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="output folder (default: benchmarks/results)",
    )
    parser.add_argument("--repeats", type=int, help="throughput rounds (default 7, quick 2)")
    parser.add_argument("--new-tokens", type=int, help="tokens per generation (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=720.0,
        help="stop the throughput rounds after this many seconds, once 3 are done (default 720)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 7)
    new_tokens = args.new_tokens or (8 if quick else 32)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {message}", flush=True)

    loadavg_start = _loadavg()
    model, tokenizer = neuronpatch.load_model(args.model)
    arch = resolve(model)
    top = patch_layers(arch) - 1
    log(
        f"loaded {args.model}: {arch.model_type}, {arch.num_layers} layers, hidden "
        f"{arch.hidden_size}, intermediate {arch.intermediate_size}"
    )
    sets = make_patch_sets(model, tokenizer, arch)
    log(
        f"built {len(sets.ungated)} patches and {len(sets.gated) + 1} gated patches of "
        f"{NEURONS_PER_PATCH} neurons"
    )

    results: dict[str, Any] = dict(
        model=args.model,
        quick=quick,
        machine=machine_info(),
        loadavg_start=loadavg_start,
        setup=dict(
            patch_counts=list(PATCH_COUNTS),
            batches=list(BATCHES),
            neurons_per_patch=NEURONS_PER_PATCH,
            patch_layers=f"0..{top}",
            delta_scale=DELTA_SCALE,
            prompts=PROMPTS,
            targets_max_slowdown_pct=targets(),
            gated_counts=list(GATED_COUNTS),
            gates=describe_gates(sets.gated_open.gates),
            gated_patch_layers=f"{sets.gated_open.gates[-1].layer + 1}..{top}",
            open_gate_request=OPEN_REQUEST.to_dict(),
        ),
    )
    results["file_size"] = file_size(sets.ungated[0], arch)
    results["file_size_gated"] = file_size(sets.gated[0], arch)
    log(
        f"patch file: {results['file_size']['bytes_per_neuron']:.0f} bytes per neuron, gated "
        f"{results['file_size_gated']['bytes_per_neuron']:.0f}"
    )
    results["apply_remove"] = apply_remove(model, sets, 2 if quick else 5, log)
    iters, loops = (10, 3) if quick else (50, 7)
    results["hook_breakdown"] = hook_breakdown(model, sets, iters, loops, log)
    results["gated_hook_breakdown"] = gated_hook_breakdown(model, sets, iters, loops, log)
    results["throughput"] = throughput(
        model, tokenizer, sets, repeats, new_tokens, 1, args.budget_s, log
    )
    results["loadavg_end"] = _loadavg()
    results["wall_s"] = time.perf_counter() - t0
    results["targets"] = assess_targets(results)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = outputs_stem(args.model)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / f"{stem}.md")
    write_plot(results, args.out / f"{stem}.png")
    for line in _target_lines(results["targets"]):
        log(line)
    log(
        f"targets end-to-end: {results['targets']['measured']}, per microbenchmark: "
        f"{results['targets']['predicted']}; wrote {args.out}/{stem}.{{json,md,png}}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
