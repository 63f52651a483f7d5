"""A Hugging Face model folder (written by `save_pretrained`) as a build source.

`load_pretrained` reads the folder with transformers' Auto classes, offline (`local_files_only=True`) and from
safetensors only (no pickle), and says what the build needs: the eager module with positional named inputs, the
manifest's input/output/text specs, the tokenizer file to ship, and padded validation batches tokenized by the
serving code itself (`handlers.frontends.text.TextEncoder`), so the build checks what the worker will feed.
transformers is needed here (the `hf` extra) and never in the worker.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from archiver.errors import BuildError, SpecError
from handlers.spec import InputSpec, OutputSpec, TextSpec

# task -> transformers Auto class
TASKS = {"sequence-classification": "AutoModelForSequenceClassification"}
TOKENIZER_FILE = "tokenizer.json"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order forward() takes them in
# Position tables longer than this are rare to need at serve time and costly to validate; a spec may raise it.
DEFAULT_MAX_LENGTH = 512
# Real sentences for validation when the spec gives none: short, long, punctuation, digits, non-ASCII.
DEFAULT_TEXTS = (
    "I loved this film, the acting was wonderful.",
    "Terrible service; we waited an hour and the food was cold.",
    "ok",
    "The update fixed the crash on start-up, but battery life is still worse than in version 2.3.",
    "Café au lait, s'il vous plaît!",
    "Not bad at all.",
)


class NamedInputs(nn.Module):
    """A transformers model called with input_ids and attention_mask positionally, answering {"logits": tensor}.

    Export wants positional tensors whose parameter names are the input names (torch.export keys dynamic shapes
    by them) and plain outputs; transformers models take keywords and answer a `ModelOutput` that also carries
    hidden states and losses the server never returns.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits}


class NamedInputsWithTypes(NamedInputs):
    """`NamedInputs` for models that also take token_type_ids (segment ids)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         return_dict=True)
        return {"logits": out.logits}


@dataclass(frozen=True)
class SampleBatch:
    """Validation rows: the texts, and their token arrays padded to `length` (axis 0: rows)."""

    texts: tuple[str, ...]
    inputs: dict[str, np.ndarray]
    length: int


@dataclass(frozen=True)
class PretrainedModel:
    """What the build takes from a model folder.

    module: eval-mode `NamedInputs`; its forward's parameters are `input_names`, in order.
    model: the transformers model itself (eval mode), for reference outputs.
    input_names: input_ids, attention_mask, and token_type_ids only when model and tokenizer use them.
    labels: from config.id2label, by index.
    tokenizer_file: path of tokenizer.json, to ship in the archive as `text.tokenizer`.
    text: the manifest's text spec (max_length, pad id, input names).
    """

    folder: str
    task: str
    module: nn.Module
    model: nn.Module
    input_names: tuple[str, ...]
    labels: tuple[str, ...]
    tokenizer_file: str
    text: TextSpec
    output_names: tuple[str, ...] = ("logits",)
    dtype: str = "int64"

    def input_specs(self, max_rows: int = 64) -> tuple[InputSpec, ...]:
        """One int64 input per token array, with a free sequence axis: shape (-1,) per row."""
        return tuple(InputSpec(shape=(-1,), dtype=self.dtype, name=n, max_rows=max_rows) for n in self.input_names)

    def output_spec(self, top_k: int = 5) -> OutputSpec:
        return OutputSpec(kind="classification", top_k=min(top_k, len(self.labels)), labels=self.labels)

    def encoder(self, max_length: Optional[int] = None) -> Any:
        """The serving tokenizer (`TextEncoder`) on this folder's tokenizer.json."""
        from handlers.frontends.text import TextEncoder

        spec = self.text if max_length is None else replace(self.text, max_length=max_length)
        return TextEncoder.from_file(self.tokenizer_file, spec)

    def sample_batches(self, texts: Sequence[str] = DEFAULT_TEXTS, lengths: Sequence[int] = (8, 32),
                       batch_sizes: Sequence[int] = (1, 4)) -> list[SampleBatch]:
        """Padded validation batches: for each length and batch size, row 0 is a text that fills the length
        exactly (sample texts joined, truncated by the tokenizer) and the other rows are the sample texts, padded.

        Lengths above the spec's max_length are lowered to it. Raises SpecError when `texts` is empty.
        """
        if not texts:
            raise SpecError("samples: give at least one sample text")
        batches = []
        for length in sorted({min(n, self.text.max_length) for n in lengths}):
            encoder = self.encoder(max_length=length)
            long_text = _long_text(encoder, texts, length)
            for size in batch_sizes:
                rows = (long_text, *(texts[i % len(texts)] for i in range(size - 1)))
                arrays, _ = encoder.encode(rows)
                batches.append(SampleBatch(rows, encoder.pad([arrays], length=length), length))
        return batches

    def reference(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The eager model's outputs on named arrays, as float32 numpy."""
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(inputs[n]) for n in self.input_names))
        return {name: tensor.float().numpy() for name, tensor in out.items()}


def load_pretrained(folder: str, task: str = "sequence-classification",
                    max_length: Optional[int] = None) -> PretrainedModel:
    """Load a `save_pretrained` folder for `task`, offline and from safetensors.

    Args:
        folder: holds config.json, model.safetensors and tokenizer.json (+ tokenizer_config.json).
        task: a key of TASKS.
        max_length: tokens per text at serve time (longer texts are truncated); default: the model's position
            table, at most DEFAULT_MAX_LENGTH.

    Raises:
        SpecError: unknown task, missing files, a model without attention_mask, max_length too long.
        BuildError: transformers is not installed, or it cannot load the folder.
    """
    if task not in TASKS:
        raise SpecError(f"source.task: '{task}' is not supported; choose one of {', '.join(TASKS)}")
    _check_folder(folder)
    transformers = _transformers()
    try:
        model = getattr(transformers, TASKS[task]).from_pretrained(folder, local_files_only=True,
                                                                   use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"transformers cannot load {folder}: {exc}") from exc
    model.eval()
    names = _input_names(model, tokenizer)
    limit = _position_limit(model, tokenizer)
    if max_length is not None and max_length > limit:
        raise SpecError(f"text.max_length: {max_length} is longer than the model's {limit} positions")
    text = TextSpec(tokenizer=TOKENIZER_FILE, max_length=max_length or min(limit, DEFAULT_MAX_LENGTH),
                    pad_id=_pad_id(model, tokenizer), input_ids="input_ids", attention_mask="attention_mask",
                    token_type_ids="token_type_ids" if "token_type_ids" in names else None)
    return PretrainedModel(folder=folder, task=task, module=_wrap(model, names), model=model,
                           input_names=names, labels=_labels(model.config),
                           tokenizer_file=os.path.join(folder, TOKENIZER_FILE), text=text)


def _wrap(model: nn.Module, names: tuple[str, ...]) -> NamedInputs:
    wrapper = NamedInputsWithTypes(model) if "token_type_ids" in names else NamedInputs(model)
    return wrapper.eval()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BuildError("building from a Hugging Face folder needs transformers: pip install 'tspack[hf]'") from exc
    return transformers


def _check_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise SpecError(f"source.pretrained: {folder} is not a folder")
    needs = {"config.json": "save the model with save_pretrained",
             "model.safetensors": "save with save_pretrained(..., safe_serialization=True); pickled "
                                  "pytorch_model.bin weights are refused",
             TOKENIZER_FILE: "save a fast tokenizer (PreTrainedTokenizerFast) with save_pretrained into it"}
    for name, fix in needs.items():
        if not os.path.isfile(os.path.join(folder, name)):
            # Sharded checkpoints write model.safetensors.index.json instead of one file; transformers loads both.
            if name == "model.safetensors" and os.path.isfile(os.path.join(folder, name + ".index.json")):
                continue
            raise SpecError(f"source.pretrained: {folder} has no {name}; {fix}")


def _input_names(model: nn.Module, tokenizer: Any) -> tuple[str, ...]:
    """Token inputs both sides use: the model's forward takes them and the tokenizer produces them.

    BERT's forward accepts token_type_ids, but a tokenizer that never makes them would have the server send
    zeros the model was not trained with a reason to expect; so they need both.
    """
    accepted = set(inspect.signature(model.forward).parameters)
    produced = set(getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")))
    missing = [n for n in ("input_ids", "attention_mask") if n not in accepted]
    if missing:
        raise SpecError(f"source.pretrained: the model's forward takes no {missing[0]}; padded batches need "
                        "input_ids and attention_mask")
    return tuple(n for n in TOKEN_INPUTS if n in accepted and (n != "token_type_ids" or n in produced))


def _position_limit(model: nn.Module, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # A tokenizer saved without a limit reports a huge sentinel (int(1e30)); it is not a real limit.
    real = [int(n) for n in limits if isinstance(n, int) and 1 < n < 1_000_000]
    return min(real) if real else DEFAULT_MAX_LENGTH


def _pad_id(model: nn.Module, tokenizer: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if isinstance(candidate, int) and candidate >= 0:
            return candidate
    return 0  # no pad token (GPT-style): padded positions are masked out, so any id serves


def _labels(config: Any) -> tuple[str, ...]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = max(getattr(config, "num_labels", 0) or 0, max(id2label, default=-1) + 1)
    return tuple(id2label.get(i, str(i)) for i in range(count))


def _long_text(encoder: Any, texts: Sequence[str], length: int) -> str:
    """Sample texts joined, repeated until the tokenizer must truncate them at `length` tokens."""
    joined = " ".join(texts)
    arrays, _ = encoder.encode([joined])
    tokens = max(1, arrays[encoder.spec.input_ids].shape[1] - 2)  # minus [CLS]/[SEP]-like specials, roughly
    return " ".join([joined] * (math.ceil(length / tokens) + 1))
