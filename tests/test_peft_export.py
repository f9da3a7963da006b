"""PEFT LoRA export: stock PEFT loads the adapter and reproduces the patch exactly."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import MODEL_TYPES, build_tiny, make_patch
from peft import LoraConfig, PeftModel

import neuronpatch
from neuronpatch import Patch, peft_export
from neuronpatch.arch import base_model_info, resolve
from neuronpatch.cli import main
from neuronpatch.errors import ExportError, GatedPatchError, NeuronpatchError
from neuronpatch.patch import Gate, LayerDelta

ATOL = 1e-5

# --- helpers ---------------------------------------------------------------------------


def _ids(model, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)  # [batch, seq]


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits  # [batch, seq, vocab]


def _patched_logits(model, patches: list[Patch], ids: torch.Tensor) -> torch.Tensor:
    """Logits with the patches applied by neuronpatch's hooks, on a copy of ``model``."""
    hooked = neuronpatch.apply(copy.deepcopy(model), *patches)
    return _logits(hooked, ids)


def _load_peft(model, directory: Path) -> PeftModel:
    """Stock PeftModel.from_pretrained on a copy; fails on PEFT's missing-key warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), directory)
    problems = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    assert problems == []
    return peft_model.eval()


def _manual_patch(model, layers: dict[int, tuple[list[int], torch.Tensor]], **meta) -> Patch:
    base = base_model_info(model)
    content = {
        layer: (torch.tensor(idx, dtype=torch.int64), deltas)
        for layer, (idx, deltas) in layers.items()
    }
    return Patch(content, base, **meta)


def _varied_patch(model, seed: int = 0) -> Patch:
    """Different k per layer (3 on layer 0, 6 on layer 2), layer 1 untouched."""
    arch = resolve(model)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer, k in ((0, 3), (2, 6)):
        idx = torch.randperm(arch.intermediate_size, generator=g)[:k].tolist()
        layers[layer] = (idx, torch.randn(k, arch.hidden_size, generator=g) * 0.5)  # [k, hidden]
    return _manual_patch(model, layers)


def _gated(patch: Patch, threshold: float = 0.999) -> Patch:
    """``patch`` with every row above layer 0 guarded by a gate reading layer 0."""
    hidden = patch.base.hidden_size
    gate = Gate(0, torch.randn(hidden), torch.zeros(hidden), threshold)
    layers = {
        layer: LayerDelta(ld.neuron_indices, ld.deltas, torch.zeros_like(ld.neuron_indices))
        for layer, ld in patch.layers.items()
        if layer > 0
    }
    return Patch(layers, patch.base, patch.base_fingerprint, gates=(gate,))


def _lora_modules(peft_model: PeftModel) -> dict[str, int]:
    """Module name -> rank, for every module PEFT put a LoRA on."""
    return {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    }


# --- exactness on the tiny models ------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_peft_adapter_equals_patch(model_type, tmp_path):
    model = build_tiny(model_type)
    ids = _ids(model)
    patch = _varied_patch(model)
    base = _logits(model, ids)
    hooked = _patched_logits(model, [patch], ids)
    assert not torch.allclose(hooked, base, atol=1e-3)  # the patch does something

    directory = patch.to_peft(tmp_path / "adapter")
    assert directory == tmp_path / "adapter"
    peft_model = _load_peft(model, directory)

    w_out = resolve(model).spec.w_out_path
    lora = _lora_modules(peft_model)
    assert sorted(lora.values()) == [3, 6]
    assert all(name.endswith(w_out) for name in lora)
    assert [name.split(".")[-1 - len(w_out.split("."))] for name in lora] == ["0", "2"]
    scalings = {m.scaling["default"] for m in peft_model.modules() if hasattr(m, "lora_A")}
    assert scalings == {1.0}

    got = _logits(peft_model, ids)
    torch.testing.assert_close(got, hooked, atol=ATOL, rtol=0)
    merged = _logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(merged, hooked, atol=ATOL, rtol=0)
    assert _logits(model, ids).equal(base)  # the original model was never touched


def test_adapter_files_and_config(tmp_path):
    model = build_tiny("gpt2")
    patch = _varied_patch(model)
    directory = patch.to_peft(tmp_path / "gpt2-adapter")
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2-adapter"]  # no temp folders left

    config = LoraConfig.from_pretrained(directory)
    modules = ["transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    assert config.peft_type == "LORA" and config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == "tiny-gpt2"
    assert sorted(config.target_modules) == modules
    assert config.rank_pattern == dict(zip(modules, [3, 6], strict=True))
    assert config.alpha_pattern == config.rank_pattern  # scaling alpha / r = 1 everywhere
    assert config.r == config.lora_alpha == 6
    assert config.fan_in_fan_out is True
    assert config.lora_dropout == 0.0 and config.bias == "none" and not config.use_rslora

    with safetensors.safe_open(directory / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["neuronpatch_patches"]) == [patch.patch_id]
        a = f.get_tensor("base_model.model.transformer.h.2.mlp.c_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.2.mlp.c_proj.lora_B.weight")
    layer = patch.layers[2]
    order = layer.neuron_indices.argsort()
    assert a.shape == (6, 64) and b.shape == (32, 6)  # [r, intermediate], [hidden, r]
    assert a.dtype == b.dtype == torch.float32
    assert a.sum().item() == 6 and a.argmax(dim=1).equal(layer.neuron_indices[order])
    assert b.T.equal(layer.deltas[order])


def test_llama_config_is_not_conv1d(tmp_path):
    model = build_tiny("llama")
    config = LoraConfig.from_pretrained(make_patch(model, layers=[1]).to_peft(tmp_path / "a"))
    assert config.fan_in_fan_out is False
    assert list(config.target_modules) == ["model.layers.1.mlp.down_proj"]


def test_auto_peft_model_loads_the_base_by_name(tmp_path):
    from peft import AutoPeftModelForCausalLM

    model = build_tiny("llama")
    model.save_pretrained(tmp_path / "base")
    model.config._name_or_path = str(tmp_path / "base")
    patch = make_patch(model, layers=[0, 2], k=3)
    ids = _ids(model)
    directory = peft_export.to_peft(patch, tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(directory).eval()
    torch.testing.assert_close(
        _logits(auto, ids), _patched_logits(model, [patch], ids), atol=ATOL, rtol=0
    )


# --- several patches -------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_stacked_export_equals_applying_both(model_type, tmp_path):
    model = build_tiny(model_type)
    hidden = resolve(model).hidden_size
    g = torch.Generator().manual_seed(1)
    first = _manual_patch(model, {1: ([5, 9], torch.randn(2, hidden, generator=g))})
    second = _manual_patch(
        model,
        {
            1: ([9, 20, 3], torch.randn(3, hidden, generator=g)),  # neuron 9 shared
            2: ([7], torch.randn(1, hidden, generator=g)),
        },
    )
    ids = _ids(model)
    both = _patched_logits(model, [first, second], ids)
    assert not torch.allclose(both, _patched_logits(model, [first], ids), atol=1e-3)
    assert not torch.allclose(both, _patched_logits(model, [second], ids), atol=1e-3)

    result = peft_export.export([first, second], tmp_path / "stacked")
    assert result.ranks == {1: 4, 2: 1}  # {3, 5, 9, 20} and {7}
    peft_model = _load_peft(model, result.directory)
    torch.testing.assert_close(_logits(peft_model, ids), both, atol=ATOL, rtol=0)
    merged = _logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(merged, both, atol=ATOL, rtol=0)


def test_shared_neuron_deltas_are_summed(tmp_path):
    model = build_tiny("llama")
    d1, d2 = torch.full((1, 32), 0.25), torch.full((1, 32), 0.5)
    first = _manual_patch(model, {0: ([11], d1)})
    second = _manual_patch(model, {0: ([11], d2)})
    directory = peft_export.to_peft([first, second], tmp_path / "a")
    with safetensors.safe_open(directory / "adapter_model.safetensors", "pt") as f:
        b = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
    assert b.shape == (32, 1) and b.T.equal(d1 + d2)


def test_export_from_patch_files(tmp_path):
    model = build_tiny("llama")
    patch = make_patch(model, layers=[1], k=2)
    path = patch.save(tmp_path / "p.safetensors")
    result = peft_export.export(str(path), tmp_path / "a")
    assert result.ranks == {1: 2} and result.num_patches == 1


# --- dtypes ----------------------------------------------------------------------------


def _weight_dtypes(directory: Path) -> set[torch.dtype]:
    with safetensors.safe_open(directory / "adapter_model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def test_bfloat16_deltas_export_as_bfloat16(tmp_path):
    model = build_tiny("llama")
    patch = _manual_patch(model, {0: ([1, 2], torch.randn(2, 32).bfloat16())})
    ids = _ids(model)
    result = peft_export.export(patch, tmp_path / "a")
    assert result.dtype == torch.bfloat16
    assert _weight_dtypes(result.directory) == {torch.bfloat16}
    got = _logits(_load_peft(model, result.directory), ids)
    torch.testing.assert_close(got, _patched_logits(model, [patch], ids), atol=ATOL, rtol=0)


def test_mixed_half_dtypes_export_as_float32(tmp_path):
    model = build_tiny("llama")
    first = _manual_patch(model, {0: ([1], torch.randn(1, 32).bfloat16())})
    second = _manual_patch(model, {0: ([1], torch.randn(1, 32).half())})
    result = peft_export.export([first, second], tmp_path / "a")
    assert result.dtype == torch.float32
    assert _weight_dtypes(result.directory) == {torch.float32}


# --- gated patches ---------------------------------------------------------------------


def test_gated_patch_is_refused_without_approximate(tmp_path):
    model = build_tiny("llama")
    gated = _gated(make_patch(model, layers=[1, 2]))
    assert gated.is_gated
    plain = make_patch(model, layers=[2], seed=1)
    for patches in (gated, [plain, gated]):
        with pytest.raises(GatedPatchError) as info:
            peft_export.to_peft(patches, tmp_path / "a")
        message = str(info.value)
        assert "every position" in message and "approximate=True" in message
        assert "--approximate" in message and "locality" in message
    assert not (tmp_path / "a").exists()


def test_gated_patch_exports_ungated_with_approximate(tmp_path):
    model = build_tiny("gpt2")
    plain = make_patch(model, layers=[1, 2], k=3)
    ids = _ids(model)
    ungated = _patched_logits(model, [plain], ids)
    assert not torch.allclose(ungated, _logits(model, ids), atol=1e-3)
    with pytest.warns(UserWarning, match="fires everywhere"):
        result = peft_export.export(_gated(plain), tmp_path / "a", approximate=True)
    assert result.approximate and result.ranks == {1: 3, 2: 3}
    with safetensors.safe_open(result.directory / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["neuronpatch_approximate"] == "true"
    got = _logits(_load_peft(model, result.directory), ids)
    torch.testing.assert_close(got, ungated, atol=ATOL, rtol=0)


def test_gates_guarding_no_row_export_exactly(tmp_path):
    model = build_tiny("llama")
    plain = make_patch(model, layers=[1])
    gate = Gate(0, torch.randn(32), torch.zeros(32), 0.5)
    unguarded = Patch(plain.layers, plain.base, plain.base_fingerprint, gates=(gate,))
    assert unguarded.gates and not unguarded.is_gated
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = peft_export.export(unguarded, tmp_path / "a")
    assert not result.approximate


def test_approximate_on_ungated_patches_is_exact_and_silent(tmp_path):
    model = build_tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = peft_export.export(make_patch(model), tmp_path / "a", approximate=True)
    assert not result.approximate


# --- refusals and atomic writes --------------------------------------------------------


def test_refusals(tmp_path):
    llama, gpt2 = build_tiny("llama"), build_tiny("gpt2")
    patch = make_patch(llama)
    with pytest.raises(ExportError, match="no patches"):
        peft_export.to_peft([], tmp_path / "a")
    with pytest.raises(ExportError, match="one base model"):
        peft_export.to_peft([patch, make_patch(gpt2)], tmp_path / "a")
    other_weights = make_patch(build_tiny("llama", seed=1), seed=1)
    with pytest.raises(ExportError, match="different weights"):
        peft_export.to_peft([patch, other_weights], tmp_path / "a")
    with pytest.raises(ExportError, match="listed twice"):
        peft_export.to_peft([patch, patch], tmp_path / "a")
    empty = _manual_patch(llama, {0: ([], torch.zeros(0, 32))})
    with pytest.raises(ExportError, match="no neuron is patched"):
        peft_export.to_peft(empty, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ExportError, NeuronpatchError)


def test_folder_with_other_files_is_refused_and_kept(tmp_path):
    patch = make_patch(build_tiny("llama"))
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"notes\.txt.*Pick a new folder"):
        patch.to_peft(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        patch.to_peft(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "work"]


def test_existing_adapter_is_replaced(tmp_path):
    model = build_tiny("llama")
    first, second = make_patch(model, layers=[0]), make_patch(model, layers=[2], seed=3)
    (tmp_path / "empty").mkdir()
    assert first.to_peft(tmp_path / "empty").exists()  # an empty folder is fine
    directory = first.to_peft(tmp_path / "a")
    second.to_peft(directory)
    ids = _ids(model)
    got = _logits(_load_peft(model, directory), ids)
    torch.testing.assert_close(got, _patched_logits(model, [second], ids), atol=ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]


def test_failed_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = build_tiny("llama")
    first, second = make_patch(model, layers=[0]), make_patch(model, layers=[2], seed=3)
    directory = first.to_peft(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft_export, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        second.to_peft(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # temp folder removed


# --- command line ----------------------------------------------------------------------


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export-peft", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: neuronpatch export-peft" in out and "--approximate" in out


def test_cli_exports_and_reports(tmp_path, capsys):
    model = build_tiny("llama")
    p1 = make_patch(model, layers=[0, 2], k=3).save(tmp_path / "p1.safetensors")
    p2 = make_patch(model, layers=[2], k=2, seed=5).save(tmp_path / "p2.safetensors")
    assert main(["export-peft", str(p1), str(p2), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote PEFT LoRA adapter" in out and "2 patches, 2 layers, float32" in out
    assert "model.layers.0.mlp.down_proj" in out and "model.layers.2.mlp.down_proj" in out
    size = (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors: {size:,} bytes" in out
    ranks = LoraConfig.from_pretrained(tmp_path / "out").rank_pattern
    assert ranks["model.layers.0.mlp.down_proj"] == 3
    assert 3 <= ranks["model.layers.2.mlp.down_proj"] <= 5  # shared neurons count once


def test_cli_errors_and_approximate(tmp_path, capsys):
    model = build_tiny("llama")
    p1 = make_patch(model, layers=[0]).save(tmp_path / "p1.safetensors")
    p2 = make_patch(build_tiny("gpt2")).save(tmp_path / "p2.safetensors")
    assert main(["export-peft", str(p1), str(p2), str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    gated = _gated(make_patch(model, layers=[1, 2])).save(tmp_path / "gated.safetensors")
    assert main(["export-peft", str(gated), str(tmp_path / "out")]) == 2
    assert "--approximate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["export-peft", str(gated), str(tmp_path / "out"), "--approximate"]) == 0
    assert "WITHOUT their gates" in capsys.readouterr().out


# --- the real model --------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_adapter_equals_patch(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, seq]
    patch = make_patch(model, layers=[3, 10, 20], k=5, scale=0.5)
    directory = patch.to_peft(tmp_path / "adapter")

    # float32, as loaded: the adapter matches the hook to fp32 rounding. The two forms run
    # different matmul kernels (1-ulp differences in W_out's output) and 30 layers grow that
    # to ~3e-5 on logits of size ~27; the fp32 model itself is ~6e-5 from float64. Hence
    # runtime's hook-vs-merge tolerance here, and the 1e-5 check in float64 below.
    base = _logits(model, ids)
    with neuronpatch.applied(model, patch):
        hooked = _logits(model, ids)
    assert _logits(model, ids).equal(base)  # the shared model is left unpatched
    assert (hooked - base).abs().max() > 1e-1
    peft_model = _load_peft(model, directory)
    assert sorted(_lora_modules(peft_model).values()) == [5, 5, 5]
    torch.testing.assert_close(_logits(peft_model, ids), hooked, atol=1e-4, rtol=1e-4)
    merged = _logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    del peft_model

    # float64: one copy, hooked first, then wrapped by PEFT in place.
    double = copy.deepcopy(model).double()
    with neuronpatch.applied(double, patch):
        hooked = _logits(double, ids)
    peft_model = PeftModel.from_pretrained(double, directory).eval()
    torch.testing.assert_close(_logits(peft_model, ids), hooked, atol=ATOL, rtol=0)
    merged = _logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(merged, hooked, atol=ATOL, rtol=0)
