"""A small BERT-style text classifier, its WordPiece tokenizer, and the real text it learns from.

Used by the demo (scripts/train_text.py), the tests and the benchmark. The corpus is VADER's sentiment lexicon
(`vader_lexicon.txt` inside the vaderSentiment wheel: 7,500 English words, phrases and emoticons, each rated
from -4 to +4 by ten people), so nothing is downloaded and no sentence is made up. Needs transformers (the `hf`
extra) and, for the corpus, vaderSentiment (the `demo` extra).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 0
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LABELS = ("negative", "positive")


@dataclass(frozen=True)
class TextCorpus:
    """Texts with integer labels into `LABELS`, split into training and held-out rows."""

    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]


def vader_corpus(heldout_share: float = 0.2) -> TextCorpus:
    """VADER's lexicon as a two-class corpus: mean rating < 0 is negative, > 0 positive (0 is dropped).

    The held-out split is by a hash of the text, so it is the same on every machine and run.
    """
    import vaderSentiment

    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [line.split("\t") for line in f if line.strip()]
    split: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for fields in rows:
        text, rating = fields[0].strip(), float(fields[1])
        if not text or rating == 0.0:
            continue
        heldout = zlib.crc32(text.encode("utf-8")) % 1000 < heldout_share * 1000
        split[heldout][0].append(text)
        split[heldout][1].append(int(rating > 0))
    (train_x, train_y), (test_x, test_y) = split[False], split[True]
    return TextCorpus(tuple(train_x), tuple(train_y), tuple(test_x), tuple(test_y))


def train_wordpiece(texts: Sequence[str], vocab_size: int = 2000) -> Any:
    """A BERT-style uncased WordPiece `tokenizers.Tokenizer` trained on `texts`, with [CLS] ... [SEP] added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer


def tiny_bert(vocab_size: int, labels: Sequence[str] = LABELS, hidden: int = 64, layers: int = 2,
              max_positions: int = 64, seed: int = SEED, init_range: float = 0.02) -> Any:
    """A randomly initialised `BertForSequenceClassification` small enough to train on 2 cores in seconds.

    init_range: std of the initial weights; tests raise it so an untrained model's answers differ by text.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=max_positions, pad_token_id=0,
        initializer_range=init_range,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def save_folder(model: Any, tokenizer: Any, folder: str) -> str:
    """`save_pretrained` of the model (safetensors) and of the tokenizer as transformers' AutoTokenizer loads it."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model.config.max_position_embeddings)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def encode_for_training(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64, padded to the longest text (at most `max_length` tokens)."""
    from tokenizers import Tokenizer

    truncating = Tokenizer.from_str(tokenizer.to_str())  # a copy: the saved tokenizer stays as trained
    truncating.enable_truncation(max_length)
    encodings = truncating.encode_batch(list(texts))
    ids = np.zeros((len(texts), max(len(e.ids) for e in encodings)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, :len(encoding.ids)] = encoding.ids
        mask[row, :len(encoding.ids)] = 1
    return ids, mask


def train_classifier(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], epochs: int = 6,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = SEED) -> Any:
    """Cross-entropy with AdamW, seeded; a fresh shuffle each epoch. Returns the model in eval."""
    import torch

    torch.manual_seed(seed)
    ids, mask = encode_for_training(tokenizer, texts, model.config.max_position_embeddings)
    ids_t, mask_t, y = torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor(list(labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            out = model(input_ids=ids_t[batch], attention_mask=mask_t[batch], labels=y[batch])
            out.loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int]) -> float:
    import torch

    ids, mask = encode_for_training(tokenizer, texts, model.config.max_position_embeddings)
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    return float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())


def untrained_folder(folder: str, texts: Sequence[str], vocab_size: int = 300, max_positions: int = 64,
                     init_range: float = 0.2, seed: int = SEED) -> str:
    """A save_pretrained folder in seconds: a tokenizer trained on `texts` and an untrained tiny BERT, for tests."""
    tokenizer = train_wordpiece(texts, vocab_size)
    model = tiny_bert(tokenizer.get_vocab_size(), max_positions=max_positions, seed=seed, init_range=init_range)
    return save_folder(model, tokenizer, folder)
