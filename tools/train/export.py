#!/usr/bin/python3
"""Exports a training checkpoint as a LLaDA-format model directory.

Writes a raw directory (manifest.json with the config and one little-endian float32 file per tensor, plus
the tokenizer files) and converts it with `vdiff make-model --from-raw`, so the shipped model.safetensors
comes from the project's one safetensors writer.

    /usr/bin/python3 tools/train/export.py --ckpt CKPT --tokenizer TOKDIR --raw RAWDIR --out models/shakespeare --dtype bf16
    /usr/bin/python3 tools/train/export.py --packed PACKDIR --tokenizer TOKDIR --raw RAWDIR --out DIR   (pack.py's)
"""
import argparse
import json
import os
import shutil
import subprocess

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def write_raw(state_dict, config, tokenizer_dir, raw_dir):
    os.makedirs(raw_dir, exist_ok=True)
    tensors = []
    for name, tensor in state_dict.items():
        file = name + ".f32"
        # numpy's "<f4" is little-endian float32 whatever the host.
        tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tofile(os.path.join(raw_dir, file))
        tensors.append({"name": name, "shape": list(tensor.shape), "file": file})
    with open(os.path.join(raw_dir, "manifest.json"), "w") as f:
        json.dump({"config": config, "tensors": tensors}, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(raw_dir, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a train.py checkpoint")
    source.add_argument("--packed", help="a pack.py directory (bf16 weights carried off the GPU machine)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--raw", required=True, help="scratch directory for the raw export")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    parser.add_argument("--weights", default="model", choices=["model", "ema"],
                        help="the trained weights, or their moving average (train.py --ema)")
    args = parser.parse_args()

    if args.packed is not None:
        from pack import unpack

        weights, config, step = unpack(args.packed)
    else:
        state = torch.load(args.ckpt)
        if args.weights not in state:
            raise SystemExit(f"{args.ckpt} has no '{args.weights}' weights")
        weights, config, step = state[args.weights], state["config"], state["step"]
    write_raw(weights, config, args.tokenizer, args.raw)
    subprocess.run(["npx", "tsx", "src/main.ts", "make-model", "--from-raw", os.path.abspath(args.raw),
                    "--out", os.path.abspath(args.out), "--dtype", args.dtype], cwd=REPO, check=True)
    print(f"exported step {step} to {args.out}")


if __name__ == "__main__":
    main()
