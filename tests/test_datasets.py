"""The benchmark loader: every format's quirks, on small records written here, and its errors."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from neuronpatch.datasets import (
    DatasetError,
    DatasetNotFoundError,
    EditRecord,
    load_records,
)
from neuronpatch.errors import NeuronpatchError
from neuronpatch.request import EditRequest
from neuronpatch.tokens import join

ZSRE = {  # KnowEdit ZsRE: ground_truth a list, answers strings or lists, a rephrase
    "subject": "Epaspidoceras",
    "target_new": "Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]},
        ]
    },
    "portability": {
        "Reasoning": [
            {
                "prompt": "What is the common name for the family Epaspidoceras belongs to?",
                "ground_truth": "Owlet moths",
            }
        ]
    },
}
WIKI_CF = {  # KnowEdit WikiData_counterfact: ground_truth a string, an empty portability list
    "subject": "Goursez Vreizh",
    "prompt": "The name of the country which Goursez Vreizh is associated with is",
    "target_new": "Franche-Comté",
    "ground_truth": "France",
    "portability": {
        "Reasoning": [],
        "Subject_Aliasing": [
            {
                "prompt": "The name of the country which Gorsedd of Brittany is associated with is",
                "ground_truth": "Franche-Comté",
            }
        ],
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The name of the founder of Goursez Vreizh is", "ground_truth": "Le Fustec"}
        ],
        "Forgetfulness": [
            {"prompt": "The founder of Goursez Vreizh, which is in France, is", "ground_truth": ""}
        ],
    },
}
WIKI_RECENT = {  # KnowEdit WikiData_recent: no ground_truth, list-of-lists answers, no locality
    "subject": "Leo Arons",
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "portability": {
        "Logical_Generalization": [
            {
                "prompt": "Is Leo Arons still alive?",
                "ground_truth": [["no"], ["incorrect", "false"]],
            }
        ],
        "Reasoning": [
            {"prompt": "The capital of the place Leo Arons died in is", "ground_truth": [[]]}
        ],
    },
}
COUNTERFACT = {  # EasyEdit's flat CounterFact
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --- formats ---------------------------------------------------------------------------


def test_knowedit_zsre(tmp_path):
    (record,) = load_records(_write(tmp_path, [ZSRE]))
    assert record == EditRecord(
        request=EditRequest(
            "Which family does Epaspidoceras belong to?",
            "Epaspidoceras",
            "Noctuidae",
            "Aspidoceratidae",
        ),
        rephrase=["What family are Epaspidoceras?"],
        portability={
            "Reasoning": [
                ("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths")
            ]
        },
        locality={
            "Relation_Specificity": [
                ("The taxon rank of Epaspidoceras is", "genus"),
                ("Epaspidoceras taxon rank", "genus"),
            ]
        },
        record_id="0",
    )


def test_knowedit_wiki_counterfact_drops_empty_lists_and_answers(tmp_path):
    (record,) = load_records(_write(tmp_path, [WIKI_CF]))
    assert record.request.target_true == "France"
    assert record.rephrase == []
    assert list(record.portability) == ["Subject_Aliasing"]  # Reasoning: [] does not count
    assert record.locality == {
        "Relation_Specificity": [("The name of the founder of Goursez Vreizh is", "Le Fustec")]
    }  # the Forgetfulness item had an empty answer: nothing to score
    # KnowEdit targets carry no leading space; join puts exactly one between
    assert join(record.request.prompt, record.request.target_new).endswith(" is Franche-Comté")


def test_knowedit_wiki_recent_list_of_lists_and_missing_keys(tmp_path):
    (record,) = load_records(_write(tmp_path, [WIKI_RECENT]))
    assert record.request.target_true is None
    assert record.portability == {
        "Logical_Generalization": [("Is Leo Arons still alive?", "no")]  # first alias
    }
    assert record.locality == {}


def test_counterfact_flat_records(tmp_path):
    records = load_records(_write(tmp_path, [COUNTERFACT, {**COUNTERFACT, "case_id": 11}]))
    assert [r.record_id for r in records] == ["10", "11"]
    record = records[0]
    assert record.request == EditRequest("BBC One, by", "BBC One", "Sega", "BBC")
    assert record.rephrase == ["BBC One is my favorite product out of everything owned by"]
    assert record.locality == {"Neighborhood": [("BBC Radio, by", "BBC")]}
    assert record.portability == {}


def test_answers_keep_their_text_verbatim(tmp_path):
    odd = {
        **ZSRE,
        "subject": "Epaspidoceras ",  # trailing space, as in ZsRE record 412
        "prompt": "Which family does Epaspidoceras belong to?",
        "target_new": " Noctuidae",  # leading space, as in ten ZsRE records
    }
    (record,) = load_records(_write(tmp_path, [odd]))
    assert record.request.target_new == " Noctuidae"
    assert join(record.request.prompt, record.request.target_new).endswith("to? Noctuidae")


def test_autodetect_and_explicit_format(tmp_path):
    path = _write(tmp_path, [COUNTERFACT])
    assert "Neighborhood" in load_records(path)[0].locality
    # read as KnowEdit, the flat neighbourhood fields mean nothing
    assert load_records(path, fmt="knowedit")[0].locality == {}
    with pytest.raises(DatasetError, match="unknown format 'rome'"):
        load_records(path, fmt="rome")


def test_n_and_jsonl(tmp_path):
    records = [ZSRE, WIKI_CF, WIKI_RECENT]
    assert len(load_records(_write(tmp_path, records), n=2)) == 2
    from_lines = load_records(_write(tmp_path, records, "data.jsonl"))
    assert from_lines == load_records(_write(tmp_path, records))
    assert [r.record_id for r in from_lines] == ["0", "1", "2"]
    assert load_records(_write(tmp_path, records), n=0) == []


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"target_new": None}, "target_new"),
        ({"target_new": ""}, "target_new"),
        ({"subject": "Ammonites"}, "subject"),  # not in the prompt
        ({"ground_truth": 7}, "ground_truth"),
        ({"rephrase_prompt": ["ok", 3]}, "rephrase_prompt"),
        (
            {"portability": {"Reasoning": [{"prompt": "Q?", "ground_truth": {"a": 1}}]}},
            "ground_truth",
        ),
        ({"portability": ["not", "a", "dict"]}, "portability"),
        ({"locality": {"Forgetfulness": "a string"}}, "locality"),
    ],
)
def test_malformed_record_names_file_index_and_field(tmp_path, change, field):
    bad = {**ZSRE, **change}
    path = _write(tmp_path, [ZSRE, bad])
    with pytest.raises(DatasetError) as info:
        load_records(path)
    message = str(info.value)
    assert str(path) in message
    assert "record 1" in message
    assert field in message
    assert isinstance(info.value, (NeuronpatchError, ValueError))


def test_missing_field(tmp_path):
    bad = {k: v for k, v in WIKI_CF.items() if k != "prompt"}
    with pytest.raises(DatasetError, match=r"record 2: field 'prompt' is missing"):
        load_records(_write(tmp_path, [WIKI_CF, WIKI_CF, bad]))


def test_repeated_case_id(tmp_path):
    with pytest.raises(DatasetError, match=r"record 1: field 'case_id'.*repeats record 0"):
        load_records(_write(tmp_path, [COUNTERFACT, COUNTERFACT]))


def test_not_json_or_not_a_list(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": ')
    with pytest.raises(DatasetError, match="broken.json: not JSON"):
        load_records(path)
    with pytest.raises(DatasetError, match="expected a JSON list of records, got a dict"):
        load_records(_write(tmp_path, {"data": [ZSRE]}))
    with pytest.raises(DatasetError, match="record 0 has fields"):
        load_records(_write(tmp_path, [{"question": "?", "answer": "!"}]))
    with pytest.raises(DatasetError, match="record 0: expected an object"):
        load_records(_write(tmp_path, ["just text"]))


# --- Hub -------------------------------------------------------------------------------


def test_missing_local_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load_records("./nope.json")


def test_hub_dataset_file_is_downloaded(tmp_path, monkeypatch):
    local = _write(tmp_path, [ZSRE, WIKI_CF])
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    records = load_records("hf://datasets/zjunlp/KnowEdit@v1/benchmark/ZsRE/ZsRE-test-all.json")
    assert len(records) == 2
    assert calls == [
        (
            "zjunlp/KnowEdit",
            "benchmark/ZsRE/ZsRE-test-all.json",
            {"repo_type": "dataset", "revision": "v1"},
        )
    ]
    load_records("zjunlp/KnowEdit/benchmark/wiki_counterfact/train_cf.json")
    assert calls[-1][:2] == ("zjunlp/KnowEdit", "benchmark/wiki_counterfact/train_cf.json")
    assert calls[-1][2]["revision"] is None


def test_hub_offline_gives_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_records("zjunlp/KnowEdit/benchmark/ZsRE/ZsRE-test-all.json")
    message = str(info.value)
    assert "not a local file" in message
    assert "'zjunlp/KnowEdit'" in message
    assert "offline" in message
