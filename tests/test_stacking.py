"""Stacking patches into one, unstacking them byte for byte, and diffing two patches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny, make_patch

import neuronpatch
from neuronpatch import fingerprint
from neuronpatch.arch import base_model_info, resolve
from neuronpatch.cli import main
from neuronpatch.errors import StackError
from neuronpatch.patch import Gate, Patch
from neuronpatch.stacking import diff, stack, unstack


def _request(i: int) -> dict:
    return {"prompt": f"fact {i} is", "subject": f"{i}", "target_new": f"new{i}"}


def _patch(model, rows: dict, request: dict, *, gates=(), dtype=torch.float32, fp_scale=1.0):
    """A patch with given rows: {layer: [(neuron, row values or seed, gate id), ...]}."""
    hidden = resolve(model).hidden_size
    layers = {}
    for layer, entries in rows.items():
        idx, deltas, gids = [], [], []
        for neuron, values, gate in entries:
            idx.append(neuron)
            if isinstance(values, int):
                values = torch.randn(hidden, generator=torch.Generator().manual_seed(values))
            deltas.append(torch.as_tensor(values, dtype=torch.float32).expand(hidden))
            gids.append(gate)
        layers[layer] = (
            torch.tensor(idx, dtype=torch.int64),
            torch.stack(deltas).to(dtype),
            torch.tensor(gids, dtype=torch.int64) if gates else None,
        )
    fp = fingerprint.compute(resolve(model)) * fp_scale
    return Patch(
        layers,
        base_model_info(model),
        base_fingerprint=fp,
        gates=gates,
        requests=[request],
        method="manual",
        hparams={"layers": (1, 2)},  # a tuple: must come back as the file holds it
        metrics={"p": 0.123456789},
        extra={"neurons": [{"layer": 1, "index": 5, "score": 1.5}]},
        created="2026-01-01T00:00:00+00:00",
    )


def _gate(model, layer: int, seed: int, threshold: float = 0.3) -> Gate:
    hidden = resolve(model).hidden_size
    g = torch.Generator().manual_seed(seed)
    return Gate(
        layer, torch.randn(hidden, generator=g), torch.randn(hidden, generator=g), threshold
    )


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def three(llama):
    """Three single-edit patches; a and b share layer 1 neuron 5; c is bf16 with its own fp."""
    a = _patch(llama, {1: [(7, 11, -1), (5, 12, -1)], 0: [(3, 13, -1)]}, _request(0))
    b = _patch(llama, {1: [(5, 21, -1), (9, 22, -1)], 2: [(0, 23, -1)]}, _request(1))
    c = _patch(
        llama,
        {2: [(4, 31, -1)], 0: [(3, 32, -1)]},  # layer 0 neuron 3 shared with a, other dtype
        _request(2),
        dtype=torch.bfloat16,
        fp_scale=1.0 + 1e-4,  # the same weights seen in another precision
    )
    return a, b, c


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_stack_does_what_applying_the_parts_does(llama):
    parts = [make_patch(llama, k=12, seed=s, requests=[_request(s)]) for s in (1, 2, 3)]
    stacked = Patch.stack(parts)
    overlap = sum(len(n["edits"]) for n in stacked.metrics["shared_neurons"])
    assert overlap > 0  # 12 of 64 neurons thrice per layer: the sum is exercised
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])
    plain = _logits(llama, ids)
    with neuronpatch.applied(llama, parts):
        separate = _logits(llama, ids)
    with neuronpatch.applied(llama, stacked):
        together = _logits(llama, ids)
    assert not torch.allclose(plain, separate, atol=1e-3)  # the patches do something
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    assert stacked.method == "stack"
    assert stacked.requests == tuple(_request(s) for s in (1, 2, 3))
    assert stacked.metrics["edits"] == 3


def test_shared_neurons_are_summed_into_one_row_and_reported(llama, three):
    a, b, c = three
    stacked = stack([a, b, c])
    layer1 = stacked.layers[1]
    assert layer1.neuron_indices.tolist() == [5, 7, 9]
    torch.testing.assert_close(
        layer1.deltas[0], a.layers[1].deltas[1] + b.layers[1].deltas[0], rtol=0, atol=0
    )
    assert torch.equal(layer1.deltas[1], a.layers[1].deltas[0])
    assert stacked.layers[0].deltas.dtype == torch.float32  # f32 + bf16 -> f32
    assert stacked.metrics["shared_neurons"] == [
        {"layer": 0, "neuron": 3, "gate": -1, "edits": [0, 2]},
        {"layer": 1, "neuron": 5, "gate": -1, "edits": [0, 1]},
    ]
    assert stacked.num_neurons == 3 + 3 + 2 - 2  # two rows shared
    assert torch.equal(stacked.base_fingerprint, a.base_fingerprint)


def test_unstack_gives_back_the_original_bytes(llama, three, tmp_path):
    stacked = stack(three)
    path = stacked.save(tmp_path / "s.safetensors")
    loaded = Patch.load(path)
    parts = unstack(loaded)
    assert len(parts) == 3
    for original, part in zip(three, parts, strict=True):
        assert part.to_bytes() == original.to_bytes()
    # the bf16 edit's own fingerprint (within tolerance, not bitwise the stack's) came back
    assert torch.equal(parts[2].base_fingerprint, three[2].base_fingerprint)
    assert not torch.equal(parts[2].base_fingerprint, loaded.base_fingerprint)


def test_unstack_restores_row_order_empty_layers_negative_zeros_and_no_fingerprint(llama):
    a = make_patch(llama, k=6, seed=4, requests=[_request(4)])  # random (unsorted) order
    b = Patch(
        {0: (torch.tensor([], dtype=torch.int64), torch.zeros(0, 32, dtype=torch.float16))},
        base_model_info(llama),
        requests=[_request(5)],
    )
    deltas = torch.randn(2, 32)
    deltas[0, :3] = -0.0  # a naive sum into zeros would turn these into +0.0
    c = Patch({2: (torch.tensor([40, 3]), deltas)}, base_model_info(llama), requests=[_request(6)])
    parts = unstack(Patch.from_bytes(stack([a, b, c]).to_bytes()))
    assert [p.to_bytes() for p in parts] == [a.to_bytes(), b.to_bytes(), c.to_bytes()]
    assert parts[1].base_fingerprint is None


def test_stacking_a_stack_takes_it_apart_and_one_edit_twice_is_refused(llama, three):
    a, b, c = three
    nested = stack([stack([a, b]), c])
    assert [p.to_bytes() for p in unstack(nested)] == [p.to_bytes() for p in three]
    assert nested.metrics["edits"] == 3
    with pytest.raises(StackError, match="same edit"):
        stack([stack([a, b]), a])


def test_gated_patches_keep_their_gates_separate_and_round_trip(llama, tmp_path):
    g1, g2 = _gate(llama, 0, seed=1), _gate(llama, 0, seed=2)
    g1_again = _gate(llama, 0, seed=1)  # equal to g1, another object
    a = _patch(llama, {1: [(5, 1, 0), (6, 2, -1)]}, _request(0), gates=(g1,))
    b = _patch(
        llama, {1: [(5, 3, 0), (5, 4, 1)], 2: [(7, 6, 1)]}, _request(1), gates=(g2, g1_again)
    )
    c = _patch(llama, {1: [(5, 5, -1)]}, _request(2))  # ungated, same neuron
    stacked = stack([a, b, c])
    assert len(stacked.gates) == 2  # g1 and g1_again are one gate
    assert stacked.gates[0].equals(g1) and stacked.gates[1].equals(g2)
    layer1 = stacked.layers[1]
    rows = list(zip(layer1.neuron_indices.tolist(), layer1.gate_ids.tolist(), strict=True))
    assert rows == [(5, -1), (5, 0), (5, 1), (6, -1)]  # neuron 5 under 3 gates: 3 rows
    assert torch.equal(layer1.deltas[0], _row(c, 1, 5, -1))
    torch.testing.assert_close(  # a's g1 row and b's g1_again row: one gate, summed
        layer1.deltas[1], _row(a, 1, 5, 0) + _row(b, 1, 5, 1), rtol=0, atol=0
    )
    assert torch.equal(layer1.deltas[2], _row(b, 1, 5, 0))  # b's g2 row on its own
    assert stacked.layers[2].gate_ids.tolist() == [0]  # b's local gate 1 is stacked gate 0
    assert stacked.metrics["shared_neurons"] == [
        {"layer": 1, "neuron": 5, "gate": 0, "edits": [0, 1]}
    ]
    loaded = Patch.load(stacked.save(tmp_path / "gated.safetensors"))
    assert loaded.to_bytes() == stacked.to_bytes()
    assert [p.to_bytes() for p in unstack(loaded)] == [p.to_bytes() for p in (a, b, c)]
    assert unstack(loaded)[2].gates == ()


def _row(patch: Patch, layer: int, neuron: int, gate: int) -> torch.Tensor:
    ld = patch.layers[layer]
    gates = ld.gate_ids.tolist() if ld.gate_ids is not None else [-1] * len(ld.neuron_indices)
    for j, (n, g) in enumerate(zip(ld.neuron_indices.tolist(), gates, strict=True)):
        if (n, g) == (neuron, gate):
            return ld.deltas[j]
    raise AssertionError(f"no row ({layer}, {neuron}, {gate})")


def test_patches_for_different_bases_are_refused_naming_both_files(llama, tmp_path):
    a = make_patch(llama, seed=1).save(tmp_path / "llama.safetensors")
    other_arch = make_patch(build_tiny("qwen2"), seed=1).save(tmp_path / "qwen.safetensors")
    other_weights = make_patch(build_tiny("llama", seed=7), seed=1).save(tmp_path / "w.safetensors")
    with pytest.raises(StackError, match=r"llama\.safetensors and .*qwen\.safetensors.*model_type"):
        stack([Patch.load(a), Patch.load(other_arch)])
    with pytest.raises(StackError, match=r"w\.safetensors.*fingerprints differ"):
        stack([Patch.load(a), Patch.load(other_weights)])
    with pytest.raises(StackError, match="at least one"):
        stack([])


def test_unstack_refuses_plain_and_malformed_patches(llama, three):
    with pytest.raises(StackError, match="is not a stacked patch"):
        unstack(three[0])
    stacked = stack(three)
    entries = json.loads(json.dumps(stacked.extra["stack"]))
    del entries[1]["layers"]["1"]["exact"]  # the shared row can no longer be split
    broken = Patch(stacked.layers, stacked.base, stacked.base_fingerprint, extra={"stack": entries})
    with pytest.raises(StackError, match="malformed"):
        unstack(broken)
    entries[0]["layers"]["1"]["rows"] = [99]
    with pytest.raises(StackError, match="malformed"):
        unstack(Patch(stacked.layers, stacked.base, extra={"stack": entries}))


def test_diff_on_known_patches(llama):
    a = _patch(llama, {1: [(5, [1.0], -1), (6, [2.0], -1)]}, _request(0))
    b_rows = {1: [(5, [-3.0], -1)], 2: [(4, [1.0], -1)]}
    b = stack([_patch(llama, b_rows, _request(0)), _patch(llama, {0: [(1, 9, -1)]}, _request(1))])
    result = diff(a, b)
    assert result["same_base"] is True
    assert result["edits"] == {"only_a": [], "only_b": [_request(1)], "both": [_request(0)]}
    hidden = math.sqrt(32)
    assert result["shared_neurons"] == [
        pytest.approx(
            {"layer": 1, "neuron": 5, "norm_a": hidden, "norm_b": 3 * hidden, "cosine": -1.0}
        )
    ]
    layers = {row["layer"]: row for row in result["layers"]}
    assert layers[1]["neurons_a"] == 2 and layers[1]["neurons_b"] == 1
    assert layers[1]["norm_a"] == pytest.approx(math.sqrt(5) * hidden)
    assert layers[2] == {
        "layer": 2, "neurons_a": 0, "neurons_b": 1, "shared": 0, "norm_a": 0.0, "norm_b": hidden
    }  # fmt: skip
    json.dumps(result)  # JSON-ready


def test_cli_stack_unstack_diff_round_trip(llama, three, tmp_path, capsys):
    files = [p.save(tmp_path / f"in{i}.safetensors") for i, p in enumerate(three)]
    out = tmp_path / "stacked.safetensors"
    assert main(["stack", *map(str, files), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 neuron(s) touched by several edits" in text
    assert f"layer 1 neuron 5: {files[0]}, {files[1]}" in text

    assert main(["unstack", str(out), "-o", str(tmp_path / "parts")]) == 0
    written = sorted((tmp_path / "parts").glob("*.safetensors"))
    assert [w.name for w in written] == ["00000-0-new0.safetensors", "00001-1-new1.safetensors",
                                         "00002-2-new2.safetensors"]  # fmt: skip
    assert [w.read_bytes() for w in written] == [f.read_bytes() for f in files]

    capsys.readouterr()
    assert main(["diff", str(files[0]), str(out)]) == 0
    text = capsys.readouterr().out
    assert "edits only in B: 2" in text and "shared neurons: 3" in text
    assert main(["diff", str(files[0]), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edits"]["both"] == [_request(0)]

    assert main(["unstack", str(files[0]), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "in0.safetensors is not a stacked patch" in err


@pytest.mark.parametrize("command", ["stack", "unstack", "diff"])
def test_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: neuronpatch {command}" in capsys.readouterr().out


def test_an_overflowing_half_precision_sum_is_refused(llama):
    a = _patch(llama, {1: [(5, [60000.0], -1)]}, _request(0), dtype=torch.float16)
    b = _patch(llama, {1: [(5, [50000.0], -1)]}, _request(1), dtype=torch.float16)
    with pytest.raises(StackError, match="overflows in layer 1; convert the patches to float32"):
        stack([a, b])


def test_a_gated_stack_runs_like_its_gated_parts(llama):
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])
    with torch.no_grad():
        h = llama(ids, output_hidden_states=True).hidden_states[1][0]  # after layer 0
    centre = h.mean(0)
    opens_at_3 = Gate(0, h[3] - centre, centre, 0.99)
    opens_at_5 = Gate(0, h[5] - centre, centre, 0.99)
    a = _patch(llama, {1: [(5, 1, 0), (6, 2, -1)]}, _request(0), gates=(opens_at_3,))
    b = _patch(llama, {1: [(5, 3, 0)], 2: [(7, 4, 0)]}, _request(1), gates=(opens_at_5,))
    plain = _logits(llama, ids)
    with neuronpatch.applied(llama, a, b):
        separate = _logits(llama, ids)
    with neuronpatch.applied(llama, stack([a, b])):
        together = _logits(llama, ids)
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(separate[:, 3:], plain[:, 3:], atol=1e-3)
    # neuron 6 of layer 1 is ungated in a: before any gate opens only it acts
    assert not torch.allclose(separate[:, :3], plain[:, :3], atol=1e-4)
