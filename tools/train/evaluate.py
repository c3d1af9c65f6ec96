#!/usr/bin/python3
"""Held-out masked-token loss of a LLaDA-format model directory at fixed mask ratios.

For each held-out window (BOS + seq_len-1 tokens) exactly round(ratio * (seq_len-1)) positions, drawn with a
fixed seed, are replaced by the mask token; the loss is the mean cross-entropy (nats/token) of the model's
prediction at the masked positions, and the same total over the bytes of text the masked tokens stand for
(the figure that compares models with different tokenizers). Ratio 1.0 means the model sees only BOS. The
directory is read with the independent PyTorch reference (tools/reference/llada.py), so this measures exactly
the weights that ship.

    /usr/bin/python3 tools/train/evaluate.py --model models/shakespeare --corpus ../shared/data/tinyshakespeare.txt
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))

from corpus import load_split  # noqa: E402
from data import Vocab, heldout_windows  # noqa: E402

RATIOS = (0.15, 0.5, 0.85, 1.0)


@torch.no_grad()
def masked_loss(forward, windows, ratio, mask_id, seed=1234, batch=16, token_bytes=None):
    """Mean CE per masked token; with token_bytes (bytes of text per token id), also per byte of masked text."""
    gen = torch.Generator().manual_seed(seed)
    total, count, n_bytes = 0.0, 0, 0
    length = windows.shape[1]
    k = round(ratio * (length - 1))
    for start in range(0, len(windows), batch):
        tokens = windows[start:start + batch]
        noisy = tokens.clone()
        masked = torch.zeros_like(tokens, dtype=torch.bool)
        for row in range(len(tokens)):
            picks = torch.randperm(length - 1, generator=gen)[:k] + 1  # never BOS at position 0
            masked[row, picks] = True
        noisy[masked] = mask_id
        logits = forward(noisy)
        total += F.cross_entropy(logits[masked].float(), tokens[masked], reduction="sum").item()
        count += int(masked.sum())
        if token_bytes is not None:
            n_bytes += int(token_bytes[tokens[masked]].sum())
    return total / count if token_bytes is None else (total / count, total / n_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: max_sequence_length)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llada  # the reference implementation

    model = llada.LLaDA.load(args.model)
    seq_len = args.seq_len or model.config["max_sequence_length"]
    vocab = Vocab(args.model)
    _, heldout_text = load_split(args.corpus)
    windows = heldout_windows(vocab, heldout_text, seq_len)
    # Bytes of text per token id (a byte-level BPE piece has one character per byte; the special tokens are not
    # in the BPE vocabulary and stand for none), so that models with different tokenizers compare per byte of
    # the same held-out text.
    token_bytes = torch.zeros(vocab.size, dtype=torch.long)
    for piece, token in vocab.encoder.vocab.items():
        token_bytes[token] = len(piece)
    results, per_byte = {}, {}
    for ratio in RATIOS:
        loss, loss_per_byte = masked_loss(model.forward, windows, ratio, model.config["mask_token_id"],
                                          token_bytes=token_bytes)
        results[str(ratio)], per_byte[str(ratio)] = loss, loss_per_byte
        print(f"mask ratio {ratio:.2f}: loss {loss:.4f} nats/token (perplexity {math.exp(loss):.1f}), "
              f"{loss_per_byte:.4f} nats/byte of the masked text", flush=True)
    print(json.dumps({"windows": len(windows), "seq_len": seq_len, "loss": results, "loss_per_byte": per_byte}))


if __name__ == "__main__":
    main()
