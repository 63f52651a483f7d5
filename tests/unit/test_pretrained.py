"""Building from a Hugging Face save_pretrained folder: what the loader reads, the samples it makes, what it refuses."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from archiver.errors import SpecError  # noqa: E402
from archiver.optimize.pretrained import DEFAULT_TEXTS, NamedInputs, load_pretrained  # noqa: E402
from archiver.zoo.text_classifier import save_folder, tiny_bert, train_wordpiece, untrained_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return untrained_folder(str(tmp_path_factory.mktemp("hf")), DEFAULT_TEXTS * 4, max_positions=48)


@pytest.fixture(scope="module")
def pretrained(folder):
    return load_pretrained(folder)


def copy_without(folder: str, name: str, target: str) -> str:
    shutil.copytree(folder, target)
    os.remove(os.path.join(target, name))
    return target


def test_reads_names_labels_pad_id_and_length_from_the_folder(pretrained, folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert pretrained.input_names == ("input_ids", "attention_mask")  # this tokenizer makes no token_type_ids
    assert pretrained.labels == ("negative", "positive")
    assert pretrained.text.pad_id == tokenizer.pad_token_id
    assert pretrained.text.max_length == 48  # the position table, which is shorter than 512
    assert pretrained.text.token_type_ids is None and pretrained.dtype == "int64"
    assert pretrained.tokenizer_file == os.path.join(folder, "tokenizer.json")
    specs = pretrained.input_specs(max_rows=8)
    assert [(s.name, s.shape, s.dtype, s.max_rows) for s in specs] == [
        ("input_ids", (-1,), "int64", 8), ("attention_mask", (-1,), "int64", 8)]
    assert pretrained.output_spec().kind == "classification" and pretrained.output_spec().top_k == 2


def test_the_module_takes_named_inputs_positionally_and_answers_the_models_logits(pretrained):
    assert isinstance(pretrained.module, NamedInputs) and not pretrained.module.training
    batch = pretrained.sample_batches(lengths=(8,), batch_sizes=(3,))[0]
    ids, mask = (torch.from_numpy(batch.inputs[n]) for n in pretrained.input_names)
    with torch.inference_mode():
        expected = pretrained.model(input_ids=ids, attention_mask=mask).logits
        out = pretrained.module(ids, mask)
    assert list(out) == ["logits"]
    torch.testing.assert_close(out["logits"], expected)


def test_sample_batches_cover_two_lengths_and_two_batch_sizes_padded(pretrained):
    batches = pretrained.sample_batches(lengths=(7, 31), batch_sizes=(1, 4))
    assert [(b.length, len(b.texts)) for b in batches] == [(7, 1), (7, 4), (31, 1), (31, 4)]
    for batch in batches:
        mask = batch.inputs["attention_mask"]
        assert batch.inputs["input_ids"].shape == mask.shape == (len(batch.texts), batch.length)
        assert mask[0].all()  # row 0 fills the length, so the length is really exercised
    assert (batches[3].inputs["attention_mask"] == 0).any()  # and shorter rows are padded
    # Row 0 is the same text alone and among padded rows: the answer must not depend on its batch-mates.
    for alone, together in ((batches[0], batches[1]), (batches[2], batches[3])):
        np.testing.assert_allclose(pretrained.reference(alone.inputs)["logits"][0],
                                   pretrained.reference(together.inputs)["logits"][0], atol=1e-5)


def test_lengths_above_max_length_are_lowered_to_it(pretrained):
    batches = pretrained.sample_batches(lengths=(8, 1000), batch_sizes=(2,))
    assert [b.length for b in batches] == [8, 48]


def test_token_type_ids_are_an_input_when_model_and_tokenizer_both_use_them(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_wordpiece(DEFAULT_TEXTS * 4, 300)
    model = tiny_bert(tokenizer.get_vocab_size(), labels=("a", "b", "c"))
    folder = save_folder(model, tokenizer, str(tmp_path / "hf"))
    fast = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True,
                                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(folder)
    pretrained = load_pretrained(folder)
    assert pretrained.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert pretrained.text.token_type_ids == "token_type_ids" and pretrained.labels == ("a", "b", "c")
    batch = pretrained.sample_batches(lengths=(8,), batch_sizes=(2,))[0]
    assert set(batch.inputs) == set(pretrained.input_names)
    assert pretrained.reference(batch.inputs)["logits"].shape == (2, 3)


def test_refuses_pickled_weights(folder, tmp_path):
    target = copy_without(folder, "model.safetensors", str(tmp_path / "bin"))
    torch.save({}, os.path.join(target, "pytorch_model.bin"))
    with pytest.raises(SpecError, match="has no model.safetensors.*pickled"):
        load_pretrained(target)


def test_refuses_a_folder_without_tokenizer_json(folder, tmp_path):
    with pytest.raises(SpecError, match="has no tokenizer.json"):
        load_pretrained(copy_without(folder, "tokenizer.json", str(tmp_path / "slow")))


def test_refuses_unknown_task_missing_folder_and_too_long_max_length(folder, tmp_path):
    with pytest.raises(SpecError, match="task: 'summarization' is not supported; choose one of sequence-class"):
        load_pretrained(folder, task="summarization")
    with pytest.raises(SpecError, match="is not a folder"):
        load_pretrained(str(tmp_path / "absent"))
    with pytest.raises(SpecError, match="max_length: 100 is longer than the model's 48 positions"):
        load_pretrained(folder, max_length=100)


def test_loads_offline(folder, monkeypatch):
    """local_files_only: nothing is fetched, even with the offline switch off; any connection attempt fails."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert load_pretrained(folder).labels == ("negative", "positive")
