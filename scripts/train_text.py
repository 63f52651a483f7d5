"""Train the demo's text classifier on VADER's sentiment lexicon and save it as a Hugging Face model folder.

The texts are the 7,500 words, phrases and emoticons of `vader_lexicon.txt` (shipped in the vaderSentiment wheel),
labelled negative or positive by their mean human rating; a fifth is held out by a hash of the text. The WordPiece
tokenizer is trained here on the training texts, and the model is a 2-layer BERT (transformers'
BertForSequenceClassification). Nothing is downloaded. About 25 s on 2 cores.

Writes into --out:
  config.json, model.safetensors          save_pretrained (safetensors)
  tokenizer.json, tokenizer_config.json   loadable by transformers' AutoTokenizer, served by `tokenizers`
  heldout.json                            {"texts": [...], "labels": [...]} (label names), for served accuracy
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

# torchao, imported by transformers when installed, warns about CUDA kernels a CPU build cannot load.
logging.getLogger("torchao").setLevel(logging.ERROR)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.zoo.text_classifier import (  # noqa: E402
    LABELS,
    accuracy,
    save_folder,
    tiny_bert,
    train_classifier,
    train_wordpiece,
    vader_corpus,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("model_store", "work", "sentiment"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    # 128 positions: the default text.max_length of a spec, so a spec that leaves it out builds as is.
    parser.add_argument("--max-positions", type=int, default=128)
    # One thread: measured on a busy 2-core VM (load 11), one epoch took 2 s with 1 thread and 70-140 s with 2,
    # whose OpenMP workers spin waiting for each other; this model is too small to gain much from a second core.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    corpus = vader_corpus()
    tokenizer = train_wordpiece(corpus.train_texts, args.vocab_size)
    model = tiny_bert(tokenizer.get_vocab_size(), hidden=args.hidden, layers=args.layers,
                      max_positions=args.max_positions)
    train_classifier(model, tokenizer, corpus.train_texts, corpus.train_labels, epochs=args.epochs)
    seconds = time.perf_counter() - started
    held_out = accuracy(model, tokenizer, corpus.test_texts, corpus.test_labels)
    save_folder(model, tokenizer, args.out)
    with open(os.path.join(args.out, "heldout.json"), "w", encoding="utf-8") as f:
        json.dump({"texts": list(corpus.test_texts), "labels": [LABELS[y] for y in corpus.test_labels]}, f)
    print(f"sentiment: {len(corpus.train_texts)} texts, vocabulary {tokenizer.get_vocab_size()}, "
          f"{args.layers} layers x {args.hidden}, {args.epochs} epochs in {seconds:.1f} s; "
          f"held-out accuracy {held_out:.1%} on {len(corpus.test_texts)} texts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
