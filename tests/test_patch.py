"""The patch file (patches/FORMAT.md): golden files, canonical bytes, atomic save, refusal of
every kind of bad input with its own error, and fuzzing of the loader."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuronpatch
from neuronpatch import BaseModelInfo, Patch, fingerprint
from neuronpatch.arch import resolve
from neuronpatch.errors import (
    CorruptPatchError,
    FormatVersionError,
    IndexOutOfRangeError,
    NeuronpatchError,
    NonFiniteDeltaError,
    NotAPatchError,
    NotSafetensorsError,
    PatchNotFoundError,
    PickleRefusedError,
    ShapeMismatchError,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "patches" / "golden"
GOLDEN = GOLDEN_DIR / "smollm2-135m-v1-manual.safetensors"
EXPECTED = json.loads((GOLDEN_DIR / "smollm2-135m-v1-manual.expected.json").read_text())
GOLDEN_BYTES = GOLDEN.read_bytes()
HEADER_END = 8 + int.from_bytes(GOLDEN_BYTES[:8], "little")  # first byte of the data section

# Deterministic in CI (same examples every run, no example database); random locally.
settings.register_profile("neuronpatch-dev", max_examples=300, deadline=None)
settings.register_profile(
    "neuronpatch-ci", max_examples=300, deadline=None, derandomize=True, database=None
)
FUZZ = settings.get_profile("neuronpatch-ci" if os.environ.get("CI") else "neuronpatch-dev")


# --- helpers ---------------------------------------------------------------------------

# Builds the same patch in this process and in a fresh one (see the determinism test).
_BUILD = """
import torch
from neuronpatch import BaseModelInfo, Patch

def build(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layers = {
        layer: (torch.randperm(64, generator=g)[:k], torch.randn(k, 32, generator=g).to(dtype))
        for layer, k in ((0, 3), (2, 5))
    }
    return Patch(
        layers,
        BaseModelInfo("tiny-llama", "llama", 3, 32, 64),
        base_fingerprint=torch.randn(3, 8, generator=g),
        requests=({"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower",
                   "target_new": " Rome", "target_true": " Paris"},),
        method="manual",
        hparams={f"h{i}": i for i in range(12)} | {"layers": [0, 2], "name": "caf\\u00e9"},
        metrics={"zeta": 0.5, "alpha": 1.25, "mid": [1, 2]},
        extra={"neurons": [{"layer": 0, "index": 7, "score": 0.1}], "b": None, "a": True},
    )
"""
_namespace: dict = {}
exec(_BUILD, _namespace)
build_patch = _namespace["build"]


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _golden_parts() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The golden patch's metadata and tensors, to edit into malformed files."""
    return dict(_header(GOLDEN_BYTES)["__metadata__"]), safetensors.torch.load(GOLDEN_BYTES)


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    return path


def _refused(path: Path, error: type[NeuronpatchError], *words: str) -> NeuronpatchError:
    """Patch.load(path) raises exactly ``error``, naming the file and the problem."""
    with pytest.raises(NeuronpatchError) as info:
        Patch.load(path)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return info.value


def _assert_valid(patch: Patch) -> None:
    """Every invariant a loaded patch promises."""
    base = patch.base
    for layer, ld in patch.layers.items():
        idx, deltas = ld.neuron_indices, ld.deltas
        assert 0 <= layer < base.num_layers
        assert idx.dtype == torch.int64 and idx.dim() == 1
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < base.intermediate_size
        assert idx.unique().numel() == idx.numel()
        assert deltas.is_floating_point() and deltas.shape == (idx.numel(), base.hidden_size)
        assert torch.isfinite(deltas).all()
    fp = patch.base_fingerprint
    if fp is not None:
        assert fp.dim() == 2 and fp.shape[0] == base.num_layers and torch.isfinite(fp).all()
    data = patch.to_bytes()  # whatever loads can be saved, and reloads identically
    assert Patch.from_bytes(data).to_bytes() == data


@torch.no_grad()
def _next_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits[0, -1]  # [vocab]


# --- golden files ----------------------------------------------------------------------


def test_golden_patch_loads_and_reserialises_byte_identically():
    patch = Patch.load(GOLDEN)
    assert hashlib.sha256(GOLDEN_BYTES).hexdigest() == EXPECTED["sha256"]
    assert patch.to_bytes() == GOLDEN_BYTES
    assert patch.base == BaseModelInfo("smollm2-135m", "llama", 30, 576, 1536)
    assert patch.method == "manual"
    request = {"prompt": EXPECTED["prompt"], "subject": "France"}
    assert patch.requests == (request | {"target_new": " Rome", "target_true": " Paris"},)
    assert list(patch.layers) == list(range(20, 27))
    assert patch.base_fingerprint is not None and patch.base_fingerprint.shape == (30, 8)
    assert patch.created == "2026-01-01T00:00:00+00:00"
    meta = _header(GOLDEN_BYTES)["__metadata__"]
    assert meta["format"] == "neuronpatch" and meta["format_version"] == "1"
    _assert_valid(patch)


def test_golden_length_prefix_starts_with_pickle_magic_byte():
    # The golden header is 3456 = 0x0D80 bytes long, so its file starts with 0x80, the pickle
    # protocol marker: the loader must tell the two apart by the JSON header, not byte 0.
    assert GOLDEN_BYTES[:1] == b"\x80"
    Patch.from_bytes(GOLDEN_BYTES)


@pytest.mark.parametrize(
    "prefix", [b"\x80\x02", b"\x80\x04", b"PK"], ids=["pickle-2", "pickle-4", "zip"]
)
def test_length_prefix_that_looks_like_pickle_or_zip_magic_loads(prefix):
    # A header of 0x0280 / 0x0480 / 0x4B50 bytes starts the file with pickle or zip magic.
    length = int.from_bytes(prefix, "little")
    base = build_patch()

    def with_padding(pad: int) -> bytes:
        return Patch(base.layers, base.base, extra={"pad": "x" * pad}, created="c").to_bytes()

    start = int.from_bytes(with_padding(0)[:8], "little")
    assert start < length
    for pad in range(length - start - 8, length - start + 8):  # one char = one header byte
        data = with_padding(pad)
        if data.startswith(prefix):
            break
    assert data.startswith(prefix)
    assert Patch.from_bytes(data).to_bytes() == data


@pytest.mark.slow
def test_golden_patch_behaviour(smollm2):
    model, tokenizer = smollm2
    patch = Patch.load(GOLDEN)
    assert fingerprint.matches(fingerprint.compute(resolve(model)), patch.base_fingerprint)
    input_ids = tokenizer(EXPECTED["prompt"], return_tensors="pt").input_ids  # [1, seq]
    neuronpatch.apply(model, patch)
    try:
        logits = _next_logits(model, input_ids)
    finally:
        neuronpatch.remove(model, patch)
    top = logits.topk(5)
    assert top.indices.tolist() == EXPECTED["top5_ids"]
    torch.testing.assert_close(top.values, torch.tensor(EXPECTED["top5_logits"]), atol=1e-3, rtol=0)
    assert tokenizer.decode(int(logits.argmax())) == " Rome" == EXPECTED["greedy"]
    assert neuronpatch.applied_patches(model) == []
    assert tokenizer.decode(int(_next_logits(model, input_ids).argmax())) == " Paris"


# --- canonical bytes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_gives_equal_bytes(tmp_path, dtype):
    patch = build_patch(dtype=dtype)
    path = patch.save(tmp_path / "edit.safetensors")
    assert path.read_bytes() == patch.to_bytes()
    loaded = Patch.load(path)
    assert loaded.source == str(path)
    assert loaded.to_bytes() == path.read_bytes()
    assert loaded.patch_id == patch.patch_id
    for layer, ld in patch.layers.items():
        assert torch.equal(loaded.layers[layer].neuron_indices, ld.neuron_indices)
        assert loaded.layers[layer].deltas.dtype == dtype
        assert torch.equal(loaded.layers[layer].deltas, ld.deltas)
    assert torch.equal(loaded.base_fingerprint, patch.base_fingerprint)
    for name in ("base", "requests", "method", "hparams", "metrics", "extra", "created"):
        assert getattr(loaded, name) == getattr(patch, name), name


def test_header_is_canonical():
    data = build_patch().to_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    text = data[8 : 8 + n].decode("ascii")
    assert text.startswith('{"__metadata__":{') and ": " not in text
    header = json.loads(text)
    meta = header.pop("__metadata__")
    assert list(meta) == sorted(meta)
    assert list(header) == sorted(header)
    assert json.loads(meta["hparams"])["name"] == "café"


def test_bytes_are_identical_across_processes(monkeypatch):
    # safetensors writes metadata in hash-map order, which changes from process to process;
    # the canonical header must hide that. SOURCE_DATE_EPOCH pins `created`.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    here = build_patch().to_bytes()
    script = _BUILD + "\nimport sys\nsys.stdout.buffer.write(build().to_bytes())\n"
    env = os.environ | {"SOURCE_DATE_EPOCH": "1700000000"}
    there = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, check=True, timeout=300
    ).stdout
    assert there == here
    assert build_patch().created == "2023-11-14T22:13:20+00:00"


# --- atomic save -----------------------------------------------------------------------


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_failed_save_leaves_existing_patch_and_no_temp_file(tmp_path, monkeypatch, fails):
    path = tmp_path / "edit.safetensors"
    build_patch(seed=0).save(path)
    good = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, fails, broken)
    with pytest.raises(OSError, match="simulated"):
        build_patch(seed=1).save(path)
    with pytest.raises(OSError, match="simulated"):
        build_patch(seed=1).save(tmp_path / "new.safetensors")
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


@pytest.mark.parametrize("name", ["edit.pt", "edit.bin", "edit.PTH", "edit.pkl"])
def test_save_refuses_pickle_suffix(tmp_path, name):
    with pytest.raises(PickleRefusedError, match="safetensors"):
        build_patch().save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# --- bad input: every problem has its own error ----------------------------------------


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.safetensors", PatchNotFoundError, "does not exist")


def test_directory(tmp_path):
    _refused(tmp_path, PatchNotFoundError, "is a directory")


@pytest.mark.parametrize(
    "content",
    [b"", b"this is plain text, not a neuronpatch patch\n" * 4, b"\x00" * 64],
    ids=["empty", "text", "zeros"],
)
def test_not_safetensors(tmp_path, content):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(content)
    _refused(path, NotSafetensorsError, "safetensors")


@pytest.mark.parametrize("keep", [4, 8, 20, HEADER_END - 5, HEADER_END + 100, -1])
def test_truncated(tmp_path, keep):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(GOLDEN_BYTES[:keep])
    _refused(path, CorruptPatchError, "truncated")


def test_corrupted_header_json(tmp_path):
    data = bytearray(GOLDEN_BYTES)
    data[9] = ord("}")  # '{"__metadata__"...' -> '{}__metadata__"...'
    path = tmp_path / "edit.safetensors"
    path.write_bytes(bytes(data))
    _refused(path, CorruptPatchError, "corrupted JSON header")


def test_corrupted_metadata_json(tmp_path):
    meta, tensors = _golden_parts()
    meta["hparams"] = '{"layers": [20, 21'
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, CorruptPatchError, "'hparams'", "not valid JSON")


def test_unexpected_tensor(tmp_path):
    meta, tensors = _golden_parts()
    tensors["lm_head.weight"] = torch.zeros(2, 2)
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, CorruptPatchError, "'lm_head.weight'")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_is_refused_and_never_unpickled(tmp_path, monkeypatch, zip_format):
    pt = tmp_path / "edit.pt"
    torch.save({"w": torch.zeros(3)}, pt, _use_new_zipfile_serialization=zip_format)
    renamed = tmp_path / "edit.safetensors"
    renamed.write_bytes(pt.read_bytes())

    def forbidden(*args, **kwargs):
        raise AssertionError("a patch loader must never unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    _refused(pt, PickleRefusedError, "pickle")
    _refused(renamed, PickleRefusedError, "pickle")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["no-metadata", "hf"])
def test_model_weights_are_not_a_patch(tmp_path, metadata):
    path = tmp_path / "model.safetensors"
    weights = {"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 16)}
    safetensors.torch.save_file(weights, str(path), metadata=metadata)
    _refused(path, NotAPatchError, "not a neuronpatch patch")


@pytest.mark.parametrize("version", ["6", "0", "1.0", "one", None])
def test_unknown_format_version(tmp_path, version):
    meta, tensors = _golden_parts()
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, FormatVersionError, f"version {version!r}", "reads versions [1, 2, 3, 4, 5]")


def test_layer_out_of_range(tmp_path):
    meta, tensors = _golden_parts()
    tensors["layers.30.neuron_indices"] = tensors.pop("layers.20.neuron_indices")
    tensors["layers.30.deltas"] = tensors.pop("layers.20.deltas")
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, IndexOutOfRangeError, "layer 30", "0..29")


@pytest.mark.parametrize("index", [1536, 10**9, -1])
def test_neuron_index_out_of_range(tmp_path, index):
    meta, tensors = _golden_parts()
    tensors["layers.23.neuron_indices"][2] = index
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, IndexOutOfRangeError, "layer 23", f"neuron index {index}", "0..1535")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_deltas(tmp_path, value):
    meta, tensors = _golden_parts()
    tensors["layers.24.deltas"][1, 100] = value
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, NonFiniteDeltaError, "layer 24", "NaN or Inf")


def test_indices_and_deltas_of_different_lengths(tmp_path):
    meta, tensors = _golden_parts()
    tensors["layers.21.neuron_indices"] = tensors["layers.21.neuron_indices"][:3].clone()
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, ShapeMismatchError, "layer 21", "3 neuron indices", "4 delta rows")


def test_wrong_delta_width(tmp_path):
    meta, tensors = _golden_parts()
    tensors["layers.22.deltas"] = tensors["layers.22.deltas"][:, :575].clone()
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, ShapeMismatchError, "layer 22", "width 575", "hidden size 576")


def test_duplicate_neuron_index(tmp_path):
    meta, tensors = _golden_parts()
    idx = tensors["layers.25.neuron_indices"]
    idx[1] = idx[0]
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, ShapeMismatchError, "layer 25", "twice")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_neuron_indices(tmp_path, dtype):
    meta, tensors = _golden_parts()
    tensors["layers.20.neuron_indices"] = tensors["layers.20.neuron_indices"].to(dtype)
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, ShapeMismatchError, "layer 20", "integer")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_non_float_deltas(tmp_path, dtype):
    meta, tensors = _golden_parts()
    tensors["layers.20.deltas"] = tensors["layers.20.deltas"].to(dtype)
    path = _write_raw(tmp_path / "edit.safetensors", tensors, meta)
    _refused(path, ShapeMismatchError, "layer 20", "[k, hidden]")


def test_malformed_headers_give_patch_errors():
    """Hand-made headers that once escaped as TypeError / RecursionError / UnicodeEncodeError."""
    meta, tensors = _golden_parts()

    def raw_header(header: bytes) -> bytes:
        return len(header).to_bytes(8, "little") + header

    with pytest.raises(FormatVersionError):  # an unhashable version
        Patch.from_bytes(
            raw_header(b'{"__metadata__":{"format":"neuronpatch","format_version":[1]}}')
        )
    with pytest.raises(CorruptPatchError):  # nesting deeper than Python's recursion limit
        Patch.from_bytes(raw_header(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    for value in ["[" * 100_000, '{"a": "\\ud800"}']:  # deep nesting; a lone surrogate
        data = safetensors.torch.save(tensors, metadata=meta | {"extra": value})
        with pytest.raises(CorruptPatchError, match="'extra'"):
            Patch.from_bytes(data)


# --- fuzzing: any bytes give a valid Patch or a NeuronpatchError -----------------------


def _load_or_refuse(data: bytes) -> None:
    try:
        patch = Patch.from_bytes(data, source="<fuzzed>")
    except NeuronpatchError as exc:
        assert "<fuzzed>" in str(exc)
        return
    _assert_valid(patch)


# Half the positions hit the length prefix and header, where most of the structure is.
_position = st.one_of(st.integers(0, HEADER_END - 1), st.integers(0, len(GOLDEN_BYTES) - 1))


@settings(FUZZ, max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(_position, st.sampled_from(["flip", "replace"]), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_mutated_bytes(mutations):
    data = bytearray(GOLDEN_BYTES)
    for position, how, value in mutations:
        data[position] = data[position] ^ (1 << value % 8) if how == "flip" else value
    _load_or_refuse(bytes(data))


@settings(FUZZ, max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, HEADER_END + 64), st.integers(0, len(GOLDEN_BYTES))))
def test_fuzz_truncated_bytes(length):
    _load_or_refuse(GOLDEN_BYTES[:length])


@settings(FUZZ, max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=256), st.booleans())
def test_fuzz_extended_bytes(extra, into_header):
    if into_header:  # grow the header: insert after it and count the bytes in its length
        length = (HEADER_END - 8 + len(extra)).to_bytes(8, "little")
        data = length + GOLDEN_BYTES[8:HEADER_END] + extra + GOLDEN_BYTES[HEADER_END:]
    else:
        data = GOLDEN_BYTES + extra
    _load_or_refuse(data)


# --- sizes and repr --------------------------------------------------------------------


def test_num_params_and_num_neurons():
    patch = build_patch()
    assert patch.num_neurons == 3 + 5
    assert patch.num_params == (3 + 5) * 32
    golden = Patch.load(GOLDEN)
    assert golden.num_neurons == 7 * 4
    assert golden.num_params == 7 * 4 * 576
    empty = Patch({}, BaseModelInfo("m", "llama", 2, 8, 16))
    assert (empty.num_neurons, empty.num_params) == (0, 0)


def test_repr():
    text = repr(Patch.load(GOLDEN))
    for part in (
        "method='manual'",
        "base='smollm2-135m' (llama)",
        "'The capital of France is' -> ' Rome'",
        "neurons=28",
        "params=16,128",
        f"source={str(GOLDEN)!r}",
    ):
        assert part in text, text
    many = Patch(
        {}, BaseModelInfo("m", "llama", 2, 8, 16), requests=[{"prompt": "p", "target_new": "t"}] * 5
    )
    assert "(5 edits)" in repr(many) and "neurons=0" in repr(many)
