"""Checks the reference against things it must agree with. Exits non-zero on the first disagreement.

    /usr/bin/python3 tools/reference/selftest.py [--upstream /path/to/ML-GSAI/LLaDA/generate.py]

1. safetensors_io: F32/BF16/F16 round trip, metadata, sharded index.
2. llada.forward against a second implementation in float64 numpy written another way (per head, RoPE as
   a rotation of (x[i], x[i + half]) pairs, GQA by index arithmetic, key padding by dropping keys); the inputs of
   products with a bf16-stored weight are rounded to bf16 there too (naive_round_bf16, written with frexp), and
   matmul.round_bf16 is checked against that rounding (ties to even).
3. generate's schedule rules (blocks, steps per block, tokens per step).
4. With --upstream: generate() against LLaDA's own generate.py (loaded from the given path, never copied
   here) on every golden case where the upstream asserts hold, token for token. The upstream file hard-codes
   EOS 126081 and EOT 126348; they are rewritten to the fixture model's ids in memory before it runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as gen  # noqa: E402
import llada  # noqa: E402
import safetensors_io  # noqa: E402
from matmul import round_bf16  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(HERE, "..", "..", "test", "fixtures", "golden"))


def check(condition: bool, message: str) -> None:
    if not condition:
        print("FAIL:", message)
        sys.exit(1)


def test_safetensors() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2, 3).half()}
        path = os.path.join(tmp, "x.safetensors")
        safetensors_io.save(path, tensors, {"format": "pt"})
        loaded, meta = safetensors_io.load(path)
        check(meta == {"format": "pt"}, "metadata round trip")
        for name, t in tensors.items():
            check(loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), f"round trip of {name}")
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        check((8 + header_len) % 8 == 0, "data is 8-byte aligned")
        safetensors_io.save_sharded(tmp, [{"a": tensors["a"]}, {"b": tensors["b"], "c": tensors["c"]}])
        os.remove(path)
        sharded = safetensors_io.load_dir(tmp)
        check(set(sharded) == set(tensors) and all(torch.equal(sharded[n], tensors[n]) for n in tensors), "shards")
    print("ok safetensors_io")


def naive_round_bf16(x) -> np.ndarray:
    """float64 values -> the nearest bf16 value (8 significant bits, ties to even), by frexp rather than a cast.
    (The self-tests' version of the reference's bf16 input rounding; normal range only.)"""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))  # x = m * 2^e, 0.5 <= |m| < 1
    return np.ldexp(np.round(m * 256.0), e - 8)  # np.round: half to even


def test_round_bf16() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20000, generator=gen) * 10.0 ** torch.randint(-6, 6, (20000,), generator=gen)
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3 * 2 ** -9 * (1 + 2 ** -8)])
    x = torch.cat([x, ties, ties.nextafter(torch.tensor(2.0)), ties.nextafter(torch.tensor(-2.0)), torch.zeros(1)])
    ours = round_bf16(x).double().numpy()
    check(np.array_equal(ours, naive_round_bf16(x.double().numpy())), "matmul.round_bf16 is not round-to-nearest-even")
    check(ours[20000] == 1.0 and ours[20001] == 1 + 2 ** -6, "bf16 ties go to even")
    print("ok bf16 rounding (ties to even)")


def numpy_forward(model: llada.LLaDA, tokens: list[int], valid: list[bool] | None = None) -> np.ndarray:
    """float64, one head and one position at a time."""
    c = model.config
    w = {k: v.double().numpy() for k, v in model.w.items()}

    def mm(x, name):  # x @ w[name]^T; its input rounded to bf16 when the weight was stored bf16
        return (naive_round_bf16(x) if name in model.bf16 else x) @ w[name].T
    p = llada.PREFIX
    n_heads, n_kv, hd = c["n_heads"], c["n_kv_heads"], model.head_dim
    half = hd // 2
    length = len(tokens)
    keys = [j for j in range(length) if valid is None or valid[j]]

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + c["rms_norm_eps"]) * weight

    def rope(vec, pos):
        out = vec.copy()
        for i in range(half):
            angle = pos * c["rope_theta"] ** (-2.0 * i / hd)
            a, b = vec[i], vec[i + half]
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x = w[p + "wte.weight"][tokens]
    for layer in range(c["n_layers"]):
        b = f"{p}blocks.{layer}."
        n = norm(x, w[b + "attn_norm.weight"])
        q, k, v = mm(n, b + "q_proj.weight"), mm(n, b + "k_proj.weight"), mm(n, b + "v_proj.weight")
        attn = np.zeros_like(q)
        for h in range(n_heads):
            g = h * n_kv // n_heads
            qs = [rope(q[i, h * hd:(h + 1) * hd], i) for i in range(length)]
            ks = {j: rope(k[j, g * hd:(g + 1) * hd], j) for j in keys}
            for i in range(length):
                scores = np.array([qs[i] @ ks[j] for j in keys]) / math.sqrt(hd)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                attn[i, h * hd:(h + 1) * hd] = sum(wj * v[j, g * hd:(g + 1) * hd] for wj, j in zip(weights, keys))
        x = x + mm(attn, b + "attn_out.weight")
        m = norm(x, w[b + "ff_norm.weight"])
        gate, up = mm(m, b + "ff_proj.weight"), mm(m, b + "up_proj.weight")
        x = x + mm(gate / (1 + np.exp(-gate)) * up, b + "ff_out.weight")
    return mm(norm(x, w[p + "ln_f.weight"]), p + ("wte.weight" if c["weight_tying"] else "ff_out.weight"))


def test_forward() -> None:
    worst = 0.0
    for name in sorted(os.listdir(GOLDEN)):
        model_dir = os.path.join(GOLDEN, name)
        if not os.path.isdir(model_dir):
            continue
        model = llada.LLaDA.load(model_dir)
        with open(model_dir + ".json") as f:
            fixture = json.load(f)
        for case in fixture["forward"]:
            tokens = case["tokens"]
            ours = model(torch.tensor([tokens]))[0].numpy()
            ref = numpy_forward(model, tokens)
            err = np.abs(ours - ref).max() / np.abs(ref).max()
            worst = max(worst, err)
            check(err < 1e-5, f"{name}: forward differs from the float64 check by {err:.2e} (relative to max)")
            stored = np.array(case["logits"])
            check(np.abs(stored - ours).max() <= 1e-5 * np.abs(ours).max() + 1e-6, f"{name}: stored logits are stale")
        # Key padding: a padded row must give the same logits as the unpadded sequence for its real tokens,
        # except that RoPE positions start at the padding (as in LLaDA's code), so compare with numpy directly.
        tokens = fixture["forward"][0]["tokens"]
        padded = [0, 0] + tokens
        valid = [False, False] + [True] * len(tokens)
        ours = model(torch.tensor([padded]), torch.tensor([valid]))[0].numpy()[2:]
        ref = numpy_forward(model, padded, valid)[2:]
        check(np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5, f"{name}: key-padding mask")
    print(f"ok forward (worst relative difference to float64: {worst:.1e})")


def test_schedule() -> None:
    check(gen.block_schedule(16, 4, 8) == [(0, 4, 2), (4, 8, 2), (8, 12, 2), (12, 16, 2)], "divisible schedule")
    check(gen.block_schedule(10, 4, 7) == [(0, 4, 3), (4, 8, 2), (8, 10, 2)], "non-divisible schedule")
    check(gen.block_schedule(10, 3, 3) == [(0, 3, 1), (3, 6, 1), (6, 9, 1), (9, 10, 1)], "steps < blocks")
    check(gen.block_schedule(6, 3, 10) == [(0, 3, 3), (3, 6, 3)], "steps > block length")
    check(gen.block_schedule(5, 8, 4) == [(0, 5, 4)], "block longer than the answer")
    check(gen.transfer_counts(12, 5) == [3, 3, 2, 2, 2], "transfer counts")
    print("ok schedule")


def load_upstream(path: str, eos: int, eot: int):
    source = open(path).read()
    source = source.replace("126081", str(eos)).replace("126348", str(eot))
    sys.modules.setdefault("transformers", types.SimpleNamespace(AutoTokenizer=None, AutoModel=None))
    module = types.ModuleType("upstream_generate")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


class UpstreamAdapter:
    """What upstream generate() expects of a model: .device and model(x, attention_mask=...).logits."""

    def __init__(self, model: llada.LLaDA):
        self.model = model
        self.device = torch.device("cpu")

    def __call__(self, x, attention_mask=None):
        return types.SimpleNamespace(logits=self.model(x, attention_mask))


def test_upstream(path: str) -> None:
    compared = 0
    for name in sorted(os.listdir(GOLDEN)):
        model_dir = os.path.join(GOLDEN, name)
        if not os.path.isdir(model_dir):
            continue
        model = llada.LLaDA.load(model_dir)
        config = model.config
        with open(model_dir + ".json") as f:
            fixture = json.load(f)
        upstream = load_upstream(path, config["eos_token_id"], fixture["eot_token_id"])
        for case in fixture["generate"]:
            p = case["params"]
            num_blocks = p["gen_length"] // p["block_length"]
            if p["gen_length"] % p["block_length"] or p["steps"] % num_blocks:
                continue  # outside what upstream accepts
            if p["cfg_scale"] > 0:
                # Upstream passes attention_mask_ that it only defines when an attention mask is given.
                mask = torch.ones(1, len(case["prompt"]), dtype=torch.long)
            else:
                mask = None
            out = upstream.generate(UpstreamAdapter(model), torch.tensor([case["prompt"]]), mask, steps=p["steps"],
                                    gen_length=p["gen_length"], block_length=p["block_length"], temperature=0.0,
                                    cfg_scale=p["cfg_scale"], remasking="low_confidence",
                                    mask_id=config["mask_token_id"], logits_eos_inf=p["logits_eos_inf"],
                                    confidence_eos_eot_inf=p["confidence_eos_eot_inf"])
            answer = out[0, len(case["prompt"]):].tolist()
            check(answer == case["answer"], f"{name}/{case['name']}: upstream {answer} != fixture {case['answer']}")
            compared += 1
    print(f"ok upstream generate.py agrees on {compared} golden cases")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", help="path to ML-GSAI/LLaDA generate.py")
    args = parser.parse_args()
    torch.set_num_threads(2)
    test_safetensors()
    test_schedule()
    test_round_bf16()
    test_forward()
    if args.upstream:
        test_upstream(args.upstream)


if __name__ == "__main__":
    main()
