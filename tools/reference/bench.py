"""Times the PyTorch reference on a model directory and prints one JSON object.

    nice -n 10 /usr/bin/python3 tools/reference/bench.py MODEL_DIR [--threads 2] [--seq-len 160]
        [--prompt-length 32] [--gen-length 128] [--block-length 32] [--steps 128] [--batches 1,8]

forward: latency of one forward over --seq-len tokens (batch 1), median and min over --repeats runs after
a warm-up. generate: the reference's generate() (low_confidence, temperature 0) over a batch of identical-
length random prompts; tokens_per_s = batch * gen_length / wall time. Weights are held as float32 (bf16/f16
are upcast at load), so memory is 4 bytes per parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as gen  # noqa: E402
import llada  # noqa: E402


def random_prompts(config: dict, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids; the mask and EOS ids are replaced by 0 so prompts hold no special meaning."""
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config["vocab_size"], (batch, length), generator=rng)
    specials = torch.tensor([config["mask_token_id"], config["eos_token_id"]])
    tokens[torch.isin(tokens, specials)] = 0
    return tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=160, help="forward length (default: prompt + gen)")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes for generate; empty: none")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = llada.LLaDA.load(args.model_dir)
    load_s = time.perf_counter() - t0
    config = model.config
    params = sum(t.numel() for t in model.w.values())

    tokens = random_prompts(config, 1, args.seq_len)
    model(tokens)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model(tokens)
        times.append(time.perf_counter() - t)

    result = {
        "implementation": "pytorch-reference",
        "model_dir": os.path.abspath(args.model_dir),
        "parameters": params,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_s": round(load_s, 3),
        "forward": {"seq_len": args.seq_len, "batch": 1, "median_ms": round(statistics.median(times) * 1e3, 3),
                    "min_ms": round(min(times) * 1e3, 3), "repeats": args.repeats},
        "generate": [],
    }
    sampling = gen.Params(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
        prompts = random_prompts(config, batch, args.prompt_length, seed=batch)
        t = time.perf_counter()
        gen.generate(model, prompts, sampling, config["mask_token_id"], config["eos_token_id"])
        elapsed = time.perf_counter() - t
        result["generate"].append({
            "batch": batch, "prompt_length": args.prompt_length, "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.steps, "wall_s": round(elapsed, 3),
            "tokens_per_s": round(batch * args.gen_length / elapsed, 3),
            "ms_per_step": round(elapsed / len_steps(sampling) * 1e3, 3),
        })
    print(json.dumps(result))


def len_steps(params: gen.Params) -> int:
    return sum(steps for _, _, steps in gen.block_schedule(params.gen_length, params.block_length, params.steps))


if __name__ == "__main__":
    main()
