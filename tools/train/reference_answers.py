#!/usr/bin/python3
"""Greedy generations of the embedded model by the PyTorch reference, for the native engine to match.

Runs tools/reference/generate.py (LLaDA's sampler, low_confidence remasking, temperature 0) with
tools/reference/llada.py on the shipped model directory and writes, per prompt, the prompt ids, the
sampling parameters, the answer ids and the decision margins (the smallest top-1/top-2 logit gap and
confidence gap at any commit). Exact token agreement across implementations only makes sense where those
margins are clear of float32 rounding; the margins are written so a reader can see that they are.
test/embedded-model.test.ts checks that the native engine produces the same answers.

    /usr/bin/python3 tools/train/reference_answers.py --model models/shakespeare --out tools/train/reference-answers.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))

import generate as reference_generate  # noqa: E402
import llada  # noqa: E402
from data import Vocab, chat_tokens  # noqa: E402

COMPLETIONS = ["ROMEO:\n", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter of"]
CHATS = ["What news from Rome, good friend?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = llada.LLaDA.load(args.model)
    vocab = Vocab(args.model)
    cases = [("completion", text, [vocab.bos] + vocab.encoder.encode(text)) for text in COMPLETIONS]
    for text in CHATS:
        ids, answer_start = chat_tokens(vocab, text, "")
        cases.append(("chat", text, ids[:answer_start]))

    out = []
    for kind, text, prompt in cases:
        params = reference_generate.Params(gen_length=48, block_length=16, steps=48, temperature=0.0,
                                           remasking="low_confidence", cfg_scale=0.0, eot_token_id=vocab.eot)
        result = reference_generate.generate(model, torch.tensor([prompt]), params, vocab.mask, vocab.eos,
                                             margins=True)
        answer = result.tokens[0, len(prompt):].tolist()
        out.append({"kind": kind, "text": text, "prompt": prompt,
                    "params": {"gen_length": params.gen_length, "block_length": params.block_length,
                               "steps": params.steps, "eot_token_id": vocab.eot},
                    "answer": answer, "answer_text": vocab.encoder.decode(answer),
                    "token_margin": result.token_margin, "select_margin": result.select_margin})
        print(f"{kind} {text!r}: margins {result.token_margin:.4f} / {result.select_margin:.4f}\n"
              f"  {vocab.encoder.decode(answer)!r}", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
