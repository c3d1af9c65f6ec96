"""The PyTorch side of the GPU benchmark (bench/gpu/run.sh): random LLaDA-8B-shaped bf16 weights made on the
GPU and written as a vdiff model directory, then a PyTorch eager bf16 implementation (SDPA attention) timed on
the same weights, with the same shapes and algorithms as the vdiff side (bench/gpu/bench_vdiff.cpp).

    python3 tools/reference/gpu_bench.py --model-dir DIR [--seed 0] [--repeat 20] [--out torch.json]
        [--prompt-out prompt.txt] [--small]

Prints one JSON object (and writes it to --out):
  ceilings   a device-to-device copy (bytes read + written per second) and an 8192^3 bf16 matmul (TFLOP/s),
             the two rates the targets are stated against;
  forward    median / min latency of one step at BxL (1x160, 1x544, 8x160, 32x160): the forward over all
             B*L tokens, the head on each canvas's last 32 positions (what a denoising step reads), float64
             softmax and argmax over them;
  generate   batch 1, prompt 32, gen 128, block 32: vanilla low-confidence decoding with 128 steps (one token
             per step, LLaDA's generate()), and Fast-dLLM's dual cache with threshold 0.9 (a refresh forward
             at each block start, then forwards of the block only against the cached keys and values; each
             step commits the most confident masked position and every other one with confidence >= 0.9).

The model: pre-norm LLaDA blocks in bf16 (hidden states bf16, RMSNorm computed in float32, RoPE in float32),
q/k/v and gate/up fused into one matmul each, torch.nn.functional.scaled_dot_product_attention
(bidirectional). --small uses a 2-layer model of the same width, for trying the script out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, mask_token_id=126336, eos_token_id=126081, max_sequence_length=4096,
                rope_theta=500000.0, rms_norm_eps=1e-5, weight_tying=False, include_bias=False)
PREFIX = "model.transformer."


def tensor_shapes(c: dict) -> list[tuple[str, list[int]]]:
    d, h, e = c["d_model"], c["mlp_hidden_size"], c["embedding_size"]
    kv = c["n_kv_heads"] * (d // c["n_heads"])
    out = [(PREFIX + "wte.weight", [e, d])]
    for i in range(c["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        out += [(b + "attn_norm.weight", [d]), (b + "q_proj.weight", [d, d]), (b + "k_proj.weight", [kv, d]),
                (b + "v_proj.weight", [kv, d]), (b + "attn_out.weight", [d, d]), (b + "ff_norm.weight", [d]),
                (b + "ff_proj.weight", [h, d]), (b + "up_proj.weight", [h, d]), (b + "ff_out.weight", [d, h])]
    out += [(PREFIX + "ln_f.weight", [d]), (PREFIX + "ff_out.weight", [e, d])]
    return out


def make_weights(c: dict, seed: int, device: str) -> dict[str, torch.Tensor]:
    """bf16 weights drawn on the device: projections N(0, 1/fan_in), embeddings N(0, 1), the head
    N(0, 9/d) (logits with a spread of a few units), norm weights 1 + N(0, 0.01)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(c):
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        elif name.endswith("wte.weight"):
            t = torch.randn(shape, generator=g, device=device)
        elif name == PREFIX + "ff_out.weight":
            t = torch.randn(shape, generator=g, device=device) * (3.0 / math.sqrt(shape[1]))
        else:
            t = torch.randn(shape, generator=g, device=device) / math.sqrt(shape[1])
        out[name] = t.to(torch.bfloat16)
    return out


def save_model(model_dir: str, c: dict, weights: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors, written tensor by tensor (bf16)."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(c, f)
    header, offset = {}, 0
    for name, t in weights.items():
        n = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(model_dir, "model.safetensors"), "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in weights.values():
            f.write(t.contiguous().view(torch.int16).cpu().numpy().tobytes())


class TorchLLaDA:
    def __init__(self, c: dict, w: dict[str, torch.Tensor]):
        self.c = c
        self.hd = c["d_model"] // c["n_heads"]
        self.eps = c["rms_norm_eps"]
        self.emb = w.pop(PREFIX + "wte.weight")
        self.head = w.pop(PREFIX + "ff_out.weight")
        self.ln_f = w.pop(PREFIX + "ln_f.weight")
        self.layers = []
        for i in range(c["n_layers"]):
            b = f"{PREFIX}blocks.{i}."
            self.layers.append(dict(
                attn_norm=w.pop(b + "attn_norm.weight"), ff_norm=w.pop(b + "ff_norm.weight"),
                qkv=torch.cat([w.pop(b + "q_proj.weight"), w.pop(b + "k_proj.weight"), w.pop(b + "v_proj.weight")]),
                o=w.pop(b + "attn_out.weight"),
                gate_up=torch.cat([w.pop(b + "ff_proj.weight"), w.pop(b + "up_proj.weight")]),
                down=w.pop(b + "ff_out.weight")))
        half = self.hd // 2
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(half, dtype=torch.float64) * 2.0 / self.hd))
        ang = torch.arange(c["max_sequence_length"], dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        dev = self.emb.device
        self.cos, self.sin = ang.cos().float().to(dev), ang.sin().float().to(dev)

    def rms(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(torch.bfloat16) * w

    def rope(self, x, positions):  # x [B, heads, n, hd]
        cos, sin = self.cos[positions], self.sin[positions]
        xf = x.float()
        half = self.hd // 2
        rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rot * sin).to(torch.bfloat16)

    @torch.no_grad()
    def forward(self, tokens, rows, cache=None, begin=0, end=None):
        """tokens [B, L]; computes positions [begin, end) (all without a cache); with `cache` (a list of
        [K, V] per layer, [B, heads, L, hd]) writes the fresh keys/values there and attends to the whole
        cache. Returns float32 logits [B, len(rows), V] for canvas positions `rows`."""
        c = self.c
        B, L = tokens.shape
        end = L if end is None else end
        n = end - begin
        H, KV, hd = c["n_heads"], c["n_kv_heads"], self.hd
        positions = torch.arange(begin, end, device=tokens.device)
        x = self.emb[tokens[:, begin:end]]
        for i, lw in enumerate(self.layers):
            h = self.rms(x, lw["attn_norm"])
            qkv = h @ lw["qkv"].T
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
            q = self.rope(q.view(B, n, H, hd).transpose(1, 2), positions)
            k = self.rope(k.view(B, n, KV, hd).transpose(1, 2), positions)
            v = v.view(B, n, KV, hd).transpose(1, 2)
            if cache is not None:
                cache[i][0][:, :, begin:end] = k
                cache[i][1][:, :, begin:end] = v
                k, v = cache[i]
            att = F.scaled_dot_product_attention(q, k, v, enable_gqa=KV != H)
            x = x + att.transpose(1, 2).reshape(B, n, H * hd) @ lw["o"].T
            h = self.rms(x, lw["ff_norm"])
            g, u = (h @ lw["gate_up"].T).chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ lw["down"].T
        x = x[:, torch.as_tensor(rows, device=x.device) - begin]
        return (self.rms(x, self.ln_f) @ self.head.T).float()

    def new_cache(self, B, L):
        c, dev = self.c, self.emb.device
        return [[torch.empty(B, c["n_kv_heads"], L, self.hd, dtype=torch.bfloat16, device=dev) for _ in range(2)]
                for _ in range(c["n_layers"])]


def pick(model, logits, canvas_rows):
    """x0 (argmax, never the mask token) and its float64 softmax probability per row."""
    logits = logits.clone()
    logits[..., model.c["mask_token_id"]] = float("-inf")
    logits[..., model.c["vocab_size"]:] = float("-inf")
    x0 = logits.argmax(-1)
    p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
    return x0, p


def generate_vanilla(model, prompt, gen, block, steps):
    c, dev = model.c, prompt.device
    canvas = torch.cat([prompt, torch.full((gen,), c["mask_token_id"], device=dev)])[None]
    P = prompt.numel()
    n_blocks = gen // block
    per_block = steps // n_blocks
    forwards = 0
    for b in range(n_blocks):
        s, e = P + b * block, P + (b + 1) * block
        rows = list(range(s, e))
        at_start = int((canvas[0, s:e] == c["mask_token_id"]).sum())
        for step in range(per_block):
            masked = canvas[0, s:e] == c["mask_token_id"]
            # LLaDA's schedule: masks at the block start / steps each, the remainder on the first steps
            k = at_start // per_block + (1 if step < at_start % per_block else 0)
            if k == 0:
                continue
            logits = model.forward(canvas, rows)[0]
            forwards += 1
            x0, p = pick(model, logits, rows)
            p = torch.where(masked, p, torch.full_like(p, float("-inf")))
            idx = torch.topk(p, k).indices
            canvas[0, s + idx] = x0[idx]
    return canvas[0, P:], forwards


def generate_dual(model, prompt, gen, block, threshold):
    c, dev = model.c, prompt.device
    canvas = torch.cat([prompt, torch.full((gen,), c["mask_token_id"], device=dev)])[None]
    P, L = prompt.numel(), prompt.numel() + gen
    cache = model.new_cache(1, L)
    forwards = 0
    for b in range(gen // block):
        s, e = P + b * block, P + (b + 1) * block
        rows = list(range(s, e))
        first = True
        while True:
            masked = canvas[0, s:e] == c["mask_token_id"]
            if not bool(masked.any()):
                break
            logits = model.forward(canvas, rows, cache, 0, L)[0] if first else model.forward(canvas, rows, cache, s, e)[0]
            first = False
            forwards += 1
            x0, p = pick(model, logits, rows)
            p = torch.where(masked, p, torch.full_like(p, float("-inf")))
            order = torch.argsort(p, descending=True, stable=True)
            take = (p[order] >= threshold) & masked[order]
            take[0] = True
            # the first row that fails ends the selection
            take = torch.cumprod(take.int(), 0).bool()
            idx = order[take]
            canvas[0, s + idx] = x0[idx]
    return canvas[0, P:], forwards


def time_cuda(fn, repeat, warmup=3):
    if not torch.cuda.is_available():  # --device cpu (a self-test of the script): wall clock
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times)


def ceilings():
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    med, _ = time_cuda(lambda: dst.copy_(src), 10)
    copy_tbs = 2 * n * 2 / (med / 1e3) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    med, _ = time_cuda(lambda: a @ b, 10)
    return {"copy_tb_s": round(copy_tbs, 2), "bf16_matmul_tflops": round(2 * 8192 ** 3 / (med / 1e3) / 1e12, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--prompt-out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a self-test of this script")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    c = dict(LLADA_8B)
    if args.small:
        c["n_layers"] = 2
    device = "cuda"
    if args.tiny:
        c.update(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96, vocab_size=1000,
                 embedding_size=1000, mask_token_id=999, eos_token_id=998, max_sequence_length=1024)
        device = "cpu"
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": c}
    result["ceilings"] = ceilings() if device == "cuda" else {}

    t0 = time.perf_counter()
    w = make_weights(c, args.seed, device)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    save_model(args.model_dir, c, w)
    t2 = time.perf_counter()
    result["weights"] = {"make_s": round(t1 - t0, 2), "save_s": round(t2 - t1, 2),
                         "bytes": sum(t.numel() * 2 for t in w.values())}
    model = TorchLLaDA(c, w)
    del w

    gen = torch.Generator().manual_seed(args.seed)
    def random_tokens(*shape):
        t = torch.randint(0, c["vocab_size"], shape, generator=gen)
        t[(t == c["mask_token_id"]) | (t == c["eos_token_id"])] = 0
        return t.to(device)

    result["forward"] = []
    for B, L in [(1, 160), (1, 544), (8, 160), (32, 160)]:
        tokens = random_tokens(B, L)
        rows = list(range(L - 32, L))
        med, best = time_cuda(lambda: pick(model, model.forward(tokens, rows), rows), args.repeat)
        result["forward"].append({"batch": B, "length": L, "rows": 32 * B, "median_ms": round(med, 3), "min_ms": round(best, 3)})
        print(json.dumps(result["forward"][-1]), flush=True)

    prompt = random_tokens(32)
    if args.prompt_out:
        with open(args.prompt_out, "w") as f:
            f.write(",".join(str(int(t)) for t in prompt.tolist()))
    out = {"prompt_length": 32, "gen_length": 128, "block_length": 32, "steps": 128}
    for name, fn in [("vanilla", lambda: generate_vanilla(model, prompt, 128, 32, 128)),
                     ("dual_threshold", lambda: generate_dual(model, prompt, 128, 32, 0.9))]:
        fn()  # warm-up
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        answer, forwards = fn()
        sync()
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(128 / seconds, 2), "forwards": forwards,
                     "answer": answer.tolist()}
        if name == "dual_threshold":
            out[name]["threshold"] = 0.9
        print(name, out[name]["tokens_per_s"], "tok/s", forwards, "forwards", flush=True)
    result["generate"] = out
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
