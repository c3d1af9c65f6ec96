#!/usr/bin/python3
"""Carries a trained model over to a larger BPE vocabulary of the same corpus, so that training can go on
from its weights instead of from scratch.

bpe.py is deterministic: a larger --vocab-size learns the same merges first and more after them, so every
token of the old vocabulary is a token of the new one, and text encodes as before with the extra merges
applied on top. Only the special tokens move (they come after the merges). Each row of the input embedding
and of the output head is copied for a token the model knows (special tokens by name) and, for a new merge
(a, b), set to the mean of a's and b's rows (parents come before the merges made of them).

    /usr/bin/python3 tools/train/widen_vocab.py --model models/shakespeare --tokenizer NEW_TOKDIR --out DIR
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))

import safetensors_io  # noqa: E402

ROWS = ("model.transformer.wte.weight", "model.transformer.ff_out.weight")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the trained model directory (config.json, weights, tokenizer)")
    p.add_argument("--tokenizer", required=True, help="bpe.py's output for the larger vocabulary")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    def tokenizer(path):
        with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
            t = json.load(f)
        return t["model"]["vocab"], t["model"]["merges"], {s["content"]: s["id"] for s in t["added_tokens"]}

    old_vocab, old_merges, old_special = tokenizer(args.model)
    new_vocab, new_merges, new_special = tokenizer(args.tokenizer)
    if new_merges[:len(old_merges)] != old_merges:
        raise SystemExit("the new tokenizer does not start with the old one's merges: not the same corpus and rules")
    with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = {name: t.to(torch.float32) for name, t in safetensors_io.load_dir(args.model).items()}
    size = max(new_special.values()) + 1
    parents = {"".join(m): m for m in new_merges}
    for name in ROWS:
        old = weights[name]
        new = torch.empty(size, old.shape[1])
        for piece, token in sorted(new_vocab.items(), key=lambda item: item[1]):
            if piece in old_vocab:
                new[token] = old[old_vocab[piece]]
            else:
                a, b = parents[piece]
                new[token] = (new[new_vocab[a]] + new[new_vocab[b]]) / 2
        for content, token in new_special.items():
            new[token] = old[old_special[content]]
        weights[name] = new
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        old_id = config[key]
        config[key] = new_special[next(c for c, i in old_special.items() if i == old_id)]
    config["vocab_size"] = config["embedding_size"] = size
    config["torch_dtype"] = "float32"
    os.makedirs(args.out, exist_ok=True)
    safetensors_io.save(os.path.join(args.out, "model.safetensors"), weights, {"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    print(f"{args.out}: vocabulary {len(old_vocab) + len(old_special)} -> {size}, "
          f"{size - len(old_vocab) - len(old_special)} new rows from their merges' parents")


if __name__ == "__main__":
    main()
