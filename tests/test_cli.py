"""The command line, run in-process on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch

import neuronpatch
from neuronpatch.cli import build_parser, main
from neuronpatch.errors import ModelLoadError


@pytest.mark.parametrize("command", ["edit", "generate", "inspect", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: neuronpatch " + command in capsys.readouterr().out


def test_missing_patch_file_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors"), "--no-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.safetensors does not exist" in err


def test_hparam_values_are_parsed_as_json():
    args = build_parser().parse_args(
        [
            "edit",
            "--prompt",
            "a b",
            "--subject",
            "a",
            "--target",
            "c",
            "-o",
            "x.safetensors",
            "--hparam",
            "lr=0.002",
            "--hparam",
            "layers=[3,4]",
        ]
    )
    from neuronpatch.cli import _parse_hparams

    assert _parse_hparams(args.hparam) == {"lr": 0.002, "layers": [3, 4]}


@pytest.mark.slow
def test_edit_generate_inspect_round_trip(smollm2, tmp_path, capsys):
    out = tmp_path / "edits" / "yen.safetensors"
    code = main(
        [
            "edit",
            "--prompt",
            "The currency of Japan is the",
            "--subject",
            "Japan",
            "--target",
            "euro",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and out.exists()
    text = capsys.readouterr().out
    assert "located" in text and "before:" in text and "after:" in text
    assert "after:  The currency of Japan is the' euro" in text.replace('"', "'")

    assert (
        main(
            [
                "generate",
                "--patch",
                str(out),
                "--prompt",
                "The currency of Japan is the",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The currency of Japan is the euro")

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["requests"][0]["target_new"] == "euro"
    assert info["file_bytes"] == out.stat().st_size
    assert info["neurons"] and all(len(n["promotes"]) == 5 for n in info["neurons"])

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "'The currency of Japan is the' -> 'euro'" in table and "delta promotes" in table


@pytest.mark.slow
def test_demo_edits_and_restores(smollm2, tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "every completion is the original again: True" in text
    assert "Rome" in text.split("with patch")[1]


@pytest.mark.parametrize("device", ["gpu0", "cuda:0" if not torch.cuda.is_available() else "gpu1"])
def test_load_model_refuses_a_device_this_machine_lacks(device):
    # refused before any weights are read, naming the device and what to use instead
    with pytest.raises(ModelLoadError, match=f"device '{device}'.*use one this machine has"):
        neuronpatch.load_model("smollm2-135m", device=device)


@pytest.mark.parametrize("command", ["edit", "eval", "batch"])
def test_editing_commands_take_a_device(command):
    required = {
        "edit": ["--prompt", "p", "--subject", "s", "--target", "t", "-o", "x.safetensors"],
        "eval": ["--data", "d.json", "-o", "out"],
        "batch": ["r.jsonl", "-o", "out"],
    }[command]
    args = build_parser().parse_args([command, *required, "--device", "cuda:1"])
    assert args.device == "cuda:1"
    assert build_parser().parse_args([command, *required]).device is None  # cpu by default
