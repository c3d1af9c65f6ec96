#!/usr/bin/python3
"""Packs trained weights into a few small bf16 files, for carrying them off a machine that cannot run
export.py (the GPU machine has no Node): shard-N.pt files of at most --shard-mib MiB each, plus pack.json
with the config, the step and which tensors each shard holds. export.py --packed DIR turns them into a model
directory; bf16 → float32 → bf16 is exact, so the exported model is these weights.

    /usr/bin/python3 tools/train/pack.py --from BEST.pt --out DIR            # a train.py --keep-best file
    /usr/bin/python3 tools/train/pack.py --from CKPT --weights ema --out DIR # a train.py checkpoint
"""
import argparse
import json
import os

import torch


def load_weights(path, weights):
    state = torch.load(path, map_location="cpu")
    if "weights" in state:  # a --keep-best file
        return state["weights"], state["config"], state["step"]
    if weights not in state:
        raise SystemExit(f"{path} has no '{weights}' weights")
    return state[weights], state["config"], state["step"]


def pack(tensors, config, step, out, shard_bytes):
    os.makedirs(out, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        if current and size + t.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(out, f"shard-{i}.pt"))
    with open(os.path.join(out, "pack.json"), "w") as f:
        json.dump({"config": config, "step": step, "shards": [sorted(s) for s in shards]}, f, indent=1)
    return len(shards)


def unpack(directory):
    """(state dict in float32, config, step) from a pack.py directory."""
    with open(os.path.join(directory, "pack.json"), encoding="utf-8") as f:
        meta = json.load(f)
    tensors = {}
    for i, names in enumerate(meta["shards"]):
        shard = torch.load(os.path.join(directory, f"shard-{i}.pt"), map_location="cpu", weights_only=True)
        if sorted(shard) != names:
            raise SystemExit(f"{directory}/shard-{i}.pt does not hold the tensors pack.json names")
        tensors.update({name: t.to(torch.float32) for name, t in shard.items()})
    return tensors, meta["config"], meta["step"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--weights", default="ema", choices=["model", "ema"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-mib", type=float, default=15)
    args = parser.parse_args()
    tensors, config, step = load_weights(args.source, args.weights)
    n = pack(tensors, config, step, args.out, int(args.shard_mib * 2**20))
    print(f"packed step {step} into {n} shards in {args.out}")


if __name__ == "__main__":
    main()
