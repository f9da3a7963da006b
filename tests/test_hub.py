"""neuronpatch.hub against a local Hub-compatible server, through the real huggingface_hub client.

Every test gets a fresh in-memory server (tests/hub_server.py) on 127.0.0.1 and a huggingface_hub
cache under tmp_path: nothing touches the network or the user's cache.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, make_patch
from hub_server import FakeHub
from huggingface_hub import ModelCard, constants, hf_hub_download

import neuronpatch
from neuronpatch import Patch, hub
from neuronpatch.cli import build_parser, main
from neuronpatch.errors import (
    AmbiguousHubPatchError,
    HubError,
    HubIntegrityError,
    HubNotFoundError,
    PickleRefusedError,
)

REPO = "alice/edits"
FRANCE = {
    "prompt": "The capital of France is",
    "subject": "France",
    "target_new": "Rome",
    "target_true": "Paris",
}
JAPAN = {"prompt": "The currency of Japan is the", "subject": "Japan", "target_new": "euro"}


@pytest.fixture
def server(request, tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """A running FakeHub, with huggingface_hub pointed at it and at a private cache.

    Parametrize indirectly with True to have the server describe patches as LFS objects.
    """
    fake = FakeHub(lfs=getattr(request, "param", False)).start()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_TOKEN", fake.token)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these environment variables once, at import: patch the constants.
    for name, value in {
        "ENDPOINT": fake.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": fake.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_SYMLINKS": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    yield fake
    fake.stop()


@pytest.fixture
def model():
    return build_tiny("llama")


def fact_patch(model, request: dict | None = None, seed: int = 0) -> Patch:
    requests = (request,) if request else ()
    return make_patch(model, layers=[1, 2], seed=seed, requests=requests, method="fine")


def commit_count(server: FakeHub, repo_id: str = REPO) -> int:
    return len(server.repos[repo_id].commits)


# --- push and pull ---------------------------------------------------------------------


@pytest.mark.parametrize("server", [False, True], ids=["git-blob", "lfs"], indirect=True)
def test_push_then_pull_round_trips_the_bytes(server, model):
    patch = fact_patch(model, FRANCE)
    url = patch.push_to_hub(REPO)

    filename = f"france-rome-{patch.patch_id[:8]}.safetensors"
    assert url == f"{server.url}/{REPO}/blob/main/{filename}"
    files = server.files(REPO)
    assert files[filename] == patch.to_bytes()
    assert set(files) == {".gitattributes", "README.md", filename}
    assert commit_count(server) == 2  # the Hub's initial commit, then patch + card together

    pulled = Patch.from_hub(REPO, filename)
    assert pulled.to_bytes() == patch.to_bytes()
    assert pulled.patch_id == patch.patch_id
    assert pulled.requests == patch.requests
    for layer, delta in patch.layers.items():
        assert torch.equal(pulled.layers[layer].neuron_indices, delta.neuron_indices)
        assert torch.equal(pulled.layers[layer].deltas, delta.deltas)
    assert pulled.source == f"hf://{REPO}/{filename}"


def test_push_creates_the_repo_private_when_asked(server, model):
    hub.push_to_hub(fact_patch(model, FRANCE), "alice/secret", private=True)
    hub.push_to_hub(fact_patch(model, JAPAN), "alice/open")
    assert server.repos["alice/secret"].private is True
    assert server.repos["alice/open"].private is False


def test_model_card_has_front_matter_table_and_usage(server, model):
    model.config._name_or_path = "smollm2-135m"  # an embedded name: maps to its Hub id
    patch = fact_patch(model, FRANCE)
    hub.push_to_hub(patch, REPO, "france.safetensors")

    card = ModelCard(server.files(REPO)["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "neuronpatch"
    assert {"knowledge-editing", "neuronpatch"} <= set(card.data.tags)
    assert (
        "| file | prompt | subject | target_new | target_true | method | layers | neurons | params |"
        in card.text
    )
    row = (
        "| [france.safetensors](france.safetensors) | The capital of France is | France | Rome "
        f"| Paris | fine | 1, 2 | 8 | {patch.num_params:,} |"
    )
    assert row in card.text
    assert 'model, tok = neuronpatch.load_model("smollm2-135m")' in card.text
    assert f'neuronpatch.apply(model, "hf://{REPO}/france.safetensors")' in card.text


def test_hub_base_model_ids():
    base = make_patch(build_tiny("llama")).base
    assert hub.hub_base_model(base) is None  # "tiny-llama": a local name, not a Hub id
    for name, hub_id in [
        ("gemma3-270m", "google/gemma-3-270m"),
        ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("org/model", "org/model"),
    ]:
        assert hub.hub_base_model(type(base)(name, "llama", 3, 32, 64)) == hub_id


def test_second_push_keeps_the_first_file_and_lists_both(server, model):
    first, second = fact_patch(model, FRANCE), fact_patch(model, JAPAN, seed=1)
    hub.push_to_hub(first, REPO, "france.safetensors")
    hub.push_to_hub(second, REPO, "japan.safetensors", commit_message="currency edit")

    files = server.files(REPO)
    assert files["france.safetensors"] == first.to_bytes()
    assert files["japan.safetensors"] == second.to_bytes()
    text = files["README.md"].decode()
    assert "[france.safetensors]" in text and "The capital of France is" in text
    assert "[japan.safetensors]" in text and "The currency of Japan is the" in text
    assert "2 patches" in text
    head = server.repos[REPO].resolve("main")
    assert head.message == "currency edit"
    assert commit_count(server) == 3

    # Pushing the same patch again changes nothing and makes no empty commit.
    hub.push_to_hub(second, REPO, "japan.safetensors")
    assert commit_count(server) == 3


def test_card_is_rebuilt_when_a_push_races_another(server, model, monkeypatch):
    """A commit landing between the listing and our commit: retry, and the card lists it."""
    first, intruder = fact_patch(model, FRANCE), fact_patch(model, JAPAN, seed=1)
    hub.push_to_hub(first, REPO, "france.safetensors")
    preupload = server.preupload
    raced = []

    def preupload_then_someone_pushes(repo_id, revision, body, headers):
        if not raced:
            raced.append(True)
            files = {**server.files(REPO), "intruder.safetensors": intruder.to_bytes()}
            server.repos[REPO].commit("main", files, "someone else")
        return preupload(repo_id, revision, body, headers)

    monkeypatch.setattr(server, "preupload", preupload_then_someone_pushes)
    hub.push_to_hub(fact_patch(model, seed=2), REPO, "third.safetensors")
    text = server.files(REPO)["README.md"].decode()
    assert raced and "[intruder.safetensors]" in text and "[third.safetensors]" in text


def test_apply_hf_address_gives_the_local_patch_logits(server, model):
    patch = fact_patch(model, FRANCE)
    hub.push_to_hub(patch, REPO, "france.safetensors")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        base = model(ids).logits
        with neuronpatch.applied(model, patch):
            local = model(ids).logits
        neuronpatch.apply(model, f"hf://{REPO}/france.safetensors")
        remote = model(ids).logits
        (applied,) = neuronpatch.applied_patches(model)
        neuronpatch.remove(model)
    assert not torch.equal(local, base)  # the patch does something
    assert torch.equal(remote, local)
    assert applied.source == f"hf://{REPO}/france.safetensors"


def test_filename_omitted_takes_the_only_patch_or_lists_the_choices(server, model):
    first = fact_patch(model, FRANCE)
    hub.push_to_hub(first, REPO, "france.safetensors")
    assert Patch.from_hub(REPO).to_bytes() == first.to_bytes()
    assert hub.load_hf(f"hf://{REPO}").patch_id == first.patch_id

    hub.push_to_hub(fact_patch(model, JAPAN, seed=1), REPO, "japan.safetensors")
    with pytest.raises(AmbiguousHubPatchError) as info:
        Patch.from_hub(REPO)
    assert "france.safetensors" in str(info.value) and "japan.safetensors" in str(info.value)


def test_missing_repo_revision_or_file_raise_hub_not_found(server, model):
    hub.push_to_hub(fact_patch(model, FRANCE), REPO, "france.safetensors")
    with pytest.raises(HubNotFoundError, match="alice/nothing.*not found"):
        Patch.from_hub("alice/nothing")
    with pytest.raises(HubNotFoundError, match=r"no file 'spain.safetensors'.*france.safetensors"):
        Patch.from_hub(REPO, "spain.safetensors")
    with pytest.raises(HubNotFoundError, match=r"no revision 'v9'.*branches: main"):
        Patch.from_hub(REPO, revision="v9")
    with pytest.raises(HubNotFoundError):  # also a PatchNotFoundError, like a missing local file
        neuronpatch.apply(model, f"hf://{REPO}/spain.safetensors")
    with pytest.raises(PickleRefusedError):
        Patch.from_hub(REPO, "pytorch_model.bin")
    assert not any("pytorch_model.bin" in r for r in server.requests)


def test_revisions_branches_tags_and_commits(server, model):
    first, second = fact_patch(model, FRANCE), fact_patch(model, JAPAN, seed=1)
    hub.push_to_hub(first, REPO, "france.safetensors")
    old = server.repos[REPO].branches["main"]
    hub.push_to_hub(second, REPO, "japan.safetensors")
    server.repos[REPO].tags["v1"] = old

    assert Patch.from_hub(REPO, revision=old).patch_id == first.patch_id  # only one patch then
    assert Patch.from_hub(REPO, revision="v1").patch_id == first.patch_id
    pulled = hub.load_hf(f"hf://{REPO}@v1/france.safetensors")
    assert pulled.patch_id == first.patch_id
    assert pulled.source == f"hf://{REPO}@v1/france.safetensors"
    with pytest.raises(HubNotFoundError, match="no file 'japan.safetensors'"):
        Patch.from_hub(REPO, "japan.safetensors", revision="v1")


@pytest.mark.parametrize("server", [False, True], ids=["git-blob", "lfs"], indirect=True)
def test_corrupted_download_raises_integrity_error_and_is_not_kept(server, model):
    patch = fact_patch(model, FRANCE)
    hub.push_to_hub(patch, REPO, "france.safetensors")
    server.corrupt.add((REPO, "france.safetensors"))
    with pytest.raises(HubIntegrityError) as info:
        Patch.from_hub(REPO, "france.safetensors")
    message = str(info.value)
    assert f"hf://{REPO}/france.safetensors" in message
    assert "sha256" in message if server.lfs else "git-sha1" in message
    assert "removed from the huggingface_hub cache; retry" in message

    server.corrupt.clear()  # the corrupted copy was evicted: a retry downloads good bytes
    assert Patch.from_hub(REPO, "france.safetensors").to_bytes() == patch.to_bytes()


# --- offline and unreachable -----------------------------------------------------------


def test_offline_after_caching(server, model, monkeypatch):
    patch = fact_patch(model, FRANCE)
    hub.push_to_hub(patch, REPO, "france.safetensors")
    Patch.from_hub(REPO)  # caches it
    seen = len(server.requests)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Patch.from_hub(REPO).to_bytes() == patch.to_bytes()
    assert Patch.from_hub(REPO, "france.safetensors").patch_id == patch.patch_id
    neuronpatch.apply(model, f"hf://{REPO}/france.safetensors")
    neuronpatch.remove(model)
    assert len(server.requests) == seen  # not one request

    with pytest.raises(HubNotFoundError, match="HF_HUB_OFFLINE"):
        Patch.from_hub("alice/never-downloaded")
    with pytest.raises(HubError, match="offline"):
        hub.push_to_hub(patch, REPO)


def test_offline_cached_file_is_still_verified(server, model, monkeypatch):
    hub.push_to_hub(fact_patch(model, FRANCE), REPO, "france.safetensors")
    Patch.from_hub(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    blob = Path(os.path.realpath(hf_hub_download(REPO, "france.safetensors")))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(HubIntegrityError, match="huggingface_hub cache"):
        Patch.from_hub(REPO)


def test_unreachable_hub_falls_back_to_the_cache_with_a_warning(server, model):
    patch = fact_patch(model, FRANCE)
    hub.push_to_hub(patch, REPO, "france.safetensors")
    Patch.from_hub(REPO)
    server.down = True
    with pytest.warns(UserWarning, match="could not reach"):
        assert Patch.from_hub(REPO).to_bytes() == patch.to_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HubNotFoundError, match="not in the local huggingface_hub cache"):
            Patch.from_hub("alice/never-downloaded")
        with pytest.raises(HubError, match="503"):
            hub.push_to_hub(patch, REPO)


def test_push_without_a_token_says_to_log_in(server, model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="log in"):
        hub.push_to_hub(fact_patch(model, FRANCE), REPO)
    assert REPO not in server.repos


# --- addresses and names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "repo_id", "filename", "revision"),
    [
        ("hf://alice/edits", "alice/edits", None, None),
        ("hf://alice/edits/", "alice/edits", None, None),
        ("hf://alice/edits/france.safetensors", "alice/edits", "france.safetensors", None),
        ("hf://alice/edits/sub/dir/x.safetensors", "alice/edits", "sub/dir/x.safetensors", None),
        ("hf://alice/edits@v1", "alice/edits", None, "v1"),
        ("hf://alice/edits@main/x.safetensors", "alice/edits", "x.safetensors", "main"),
        ("hf://alice/edits@refs/pr/3/x.safetensors", "alice/edits", "x.safetensors", "refs/pr/3"),
        ("hf://alice/edits@feat%2Fa/x.safetensors", "alice/edits", "x.safetensors", "feat/a"),
        ("hf://models/alice/edits/x.safetensors", "alice/edits", "x.safetensors", None),
    ],
)
def test_parse_address(address, repo_id, filename, revision):
    parsed = hub.parse_address(address)
    assert (parsed.repo_id, parsed.filename, parsed.revision) == (repo_id, filename, revision)
    assert hub.parse_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    "address",
    [
        "alice/edits",
        "hf://alice",
        "hf://alice/edits@",
        "hf://alice/edits//x.safetensors",
        "hf://alice/edits/../x.safetensors",
        "hf://datasets/alice/edits",
        "hf://al ice/edits",
        "hf://alice/ed--its",
    ],
)
def test_parse_address_refuses_malformed_addresses(address):
    with pytest.raises(HubError, match="hf://|repo id|not a valid|model repos"):
        hub.parse_address(address)


def test_default_filename_is_a_readable_stable_slug(model):
    patch = fact_patch(model, {"prompt": "Köln liegt in", "subject": "Köln", "target_new": "Ö/Ä"})
    assert hub.default_filename(patch) == f"koln-o-a-{patch.patch_id[:8]}.safetensors"
    assert hub.default_filename(fact_patch(model)).startswith("patch-")
    assert hub.default_filename(patch) == hub.default_filename(Patch.from_bytes(patch.to_bytes()))


def test_push_refuses_a_non_safetensors_name(server, model):
    with pytest.raises(HubError, match=r"\.safetensors"):
        hub.push_to_hub(fact_patch(model), REPO, "notes.txt")
    with pytest.raises(PickleRefusedError):
        hub.push_to_hub(fact_patch(model), REPO, "adapter.bin")


# --- command line ----------------------------------------------------------------------


def test_cli_push_pull_round_trip(server, model, tmp_path, capsys):
    first, second = fact_patch(model, FRANCE), fact_patch(model, JAPAN, seed=1)
    first.save(tmp_path / "france.safetensors")
    second.save(tmp_path / "japan.safetensors")

    assert main(["push", str(tmp_path / "france.safetensors"), REPO, "--message", "first"]) == 0
    url = capsys.readouterr().out.strip()
    name = hub.default_filename(first)
    assert url == f"{server.url}/{REPO}/blob/main/{name}"
    assert server.repos[REPO].resolve("main").message == "first"
    assert (
        main(["push", str(tmp_path / "japan.safetensors"), REPO, "--filename", "j.safetensors"])
        == 0
    )
    capsys.readouterr()

    out = tmp_path / "pulled"
    assert main(["pull", REPO, "-o", str(out)]) == 0  # every patch in the repo
    printed = capsys.readouterr().out
    assert (out / name).read_bytes() == first.to_bytes()
    assert (out / "j.safetensors").read_bytes() == second.to_bytes()
    assert str(out / name) in printed and str(out / "j.safetensors") in printed

    one = tmp_path / "one"
    assert main(["pull", f"{REPO}/j.safetensors", "-o", str(one), "--revision", "main"]) == 0
    assert [p.name for p in one.iterdir()] == ["j.safetensors"]

    assert main(["pull", f"{REPO}/spain.safetensors", "-o", str(one)]) != 0
    err = capsys.readouterr().err
    assert "no file 'spain.safetensors'" in err and "j.safetensors" in err


def test_cli_pull_skips_non_patch_safetensors(server, model, tmp_path, capsys):
    import safetensors.torch

    hub.push_to_hub(fact_patch(model, FRANCE), REPO, "france.safetensors")
    weights = safetensors.torch.save({"w": torch.zeros(2)})
    server.repos[REPO].commit("main", {**server.files(REPO), "model.safetensors": weights}, "w")
    assert main(["pull", REPO, "-o", str(tmp_path)]) == 0
    assert (tmp_path / "france.safetensors").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert "skipped model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["push", "pull"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Hub" in text and ("--filename" in text if command == "push" else "--revision" in text)
