"""An independent PyTorch implementation of the LLaDA mask predictor, computed in float32.

Reads an HF-style directory: config.json with LLaDA's keys and model.safetensors (or the shards named by
model.safetensors.index.json). Weights stored as bf16 or f16 are upcast exactly to float32 and everything runs
in float32, with one rule for the products with a bf16-stored weight matrix (q/k/v/attn_out, ff_proj/up_proj/ff_out,
the head, also a tied head over a bf16 wte): the activations are rounded to bf16 first (matmul.py, the rule the
native engine follows). Attention scores, P.V, norms, RoPE and the embedding lookup stay plain f32.

Architecture (per block, pre-norm):
    h = x + attn_out(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   with n = rms(x) * attn_norm
    x = h + ff_out(silu(ff_proj(m)) * up_proj(m))                              with m = rms(h) * ff_norm
logits = head(rms(x) * ln_f), head = model.transformer.ff_out (or wte when weight_tying).
RMSNorm: x * rsqrt(mean(x^2) + eps) * w. RoPE: NeoX rotate-half over the full head dim, positions 0..L-1,
inverse frequencies theta^(-2i/head_dim). Attention is bidirectional, scaled by 1/sqrt(head_dim), with grouped
key/value heads when n_kv_heads < n_heads (query head h reads kv head h // (n_heads / n_kv_heads)).
"""
from __future__ import annotations

import json
import math
import os

import torch

import safetensors_io
from matmul import linear, upcast

PREFIX = "model.transformer."


def read_config(model_dir: str) -> dict:
    """config.json with LLaDA's keys, defaults filled in."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return normalize_config(json.load(f), f"{model_dir}/config.json")


def normalize_config(raw: dict, where: str = "config") -> dict:
    """Checks the required keys and fills the defaults the native loader fills."""
    required = ["d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "mask_token_id",
                "eos_token_id", "max_sequence_length"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    config = dict(raw)
    if config.get("n_kv_heads") is None:
        config["n_kv_heads"] = raw["n_heads"]
    if config.get("embedding_size") is None:
        config["embedding_size"] = raw["vocab_size"]
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("weight_tying", False)
    config.setdefault("include_bias", False)
    if config["include_bias"]:
        raise ValueError(f"{where}: include_bias true is not supported")
    if config["d_model"] % config["n_heads"] or config["n_heads"] % config["n_kv_heads"]:
        raise ValueError(f"{where}: d_model must divide by n_heads and n_heads by n_kv_heads")
    if (config["d_model"] // config["n_heads"]) % 2:
        raise ValueError(f"{where}: head_dim must be even for rotate-half RoPE")
    return config


def tensor_shapes(config: dict) -> dict[str, list[int]]:
    """Every tensor name a checkpoint must hold, with its shape."""
    d, h, e = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    head_dim = d // config["n_heads"]
    kv = config["n_kv_heads"] * head_dim
    shapes = {PREFIX + "wte.weight": [e, d]}
    for i in range(config["n_layers"]):
        b = f"{PREFIX}blocks.{i}."
        shapes[b + "attn_norm.weight"] = [d]
        shapes[b + "q_proj.weight"] = [d, d]
        shapes[b + "k_proj.weight"] = [kv, d]
        shapes[b + "v_proj.weight"] = [kv, d]
        shapes[b + "attn_out.weight"] = [d, d]
        shapes[b + "ff_norm.weight"] = [d]
        shapes[b + "ff_proj.weight"] = [h, d]
        shapes[b + "up_proj.weight"] = [h, d]
        shapes[b + "ff_out.weight"] = [d, h]
    shapes[PREFIX + "ln_f.weight"] = [d]
    if not config["weight_tying"]:
        shapes[PREFIX + "ff_out.weight"] = [e, d]
    return shapes


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim]; angles in float64 so the tables are correctly rounded float32."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64) * 2.0 / head_dim))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LLaDA:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.config = config
        # f32 copies (exact from bf16 and f16) and the names stored as bf16 (their products round the input).
        self.w, self.bf16 = upcast(weights, tensor_shapes(config))
        self.head_name = PREFIX + ("wte.weight" if config["weight_tying"] else "ff_out.weight")
        self.head = self.w[self.head_name]
        self.head_dim = config["d_model"] // config["n_heads"]
        self.rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def load(cls, model_dir: str) -> "LLaDA":
        return cls(read_config(model_dir), safetensors_io.load_dir(model_dir))

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ w[name]^T, x rounded to bf16 first when that weight was stored as bf16 (matmul.py)."""
        return linear(x, self.w[name], name in self.bf16)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] int64 -> the final normalised hidden states [B, L, d_model] (what the head reads).

        attention_mask [B, L] (1/True = real token): padded keys are never attended to. Positions for RoPE
        are 0..L-1 regardless of padding, as in LLaDA's own modelling code.
        """
        c = self.config
        batch, length = tokens.shape
        if length > c["max_sequence_length"]:
            raise ValueError(f"sequence length {length} exceeds max_sequence_length {c['max_sequence_length']}")
        n_heads, n_kv = c["n_heads"], c["n_kv_heads"]
        hd = self.head_dim
        eps = c["rms_norm_eps"]
        if length not in self.rope_cache:
            self.rope_cache[length] = rope_tables(length, hd, float(c["rope_theta"]))
        cos, sin = self.rope_cache[length]

        key_bias = None
        if attention_mask is not None:
            key_bias = torch.zeros(batch, 1, 1, length)
            key_bias.masked_fill_(~attention_mask.bool()[:, None, None, :], float("-inf"))

        x = self.w[PREFIX + "wte.weight"][tokens]  # [B, L, D]
        for i in range(c["n_layers"]):
            b = f"{PREFIX}blocks.{i}."
            n = rms_norm(x, self.w[b + "attn_norm.weight"], eps)
            q = self.linear(n, b + "q_proj.weight").view(batch, length, n_heads, hd).transpose(1, 2)
            k = self.linear(n, b + "k_proj.weight").view(batch, length, n_kv, hd).transpose(1, 2)
            v = self.linear(n, b + "v_proj.weight").view(batch, length, n_kv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if n_kv != n_heads:
                group = n_heads // n_kv
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # [B, heads, L, L]
            if key_bias is not None:
                scores = scores + key_bias
            attn = torch.softmax(scores, dim=-1) @ v  # [B, heads, L, hd]
            attn = attn.transpose(1, 2).reshape(batch, length, n_heads * hd)
            x = x + self.linear(attn, b + "attn_out.weight")

            m = rms_norm(x, self.w[b + "ff_norm.weight"], eps)
            gate = self.linear(m, b + "ff_proj.weight")
            up = self.linear(m, b + "up_proj.weight")
            x = x + self.linear(torch.nn.functional.silu(gate) * up, b + "ff_out.weight")

        return rms_norm(x, self.w[PREFIX + "ln_f.weight"], eps)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] int64 -> logits [B, L, embedding_size] float32 (see hidden for attention_mask)."""
        return self.linear(self.hidden(tokens, attention_mask), self.head_name)

    __call__ = forward


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for a config, scaled so that logits have a spread of several units.

    Projections are N(0, gain^2 / fan_in) so activations stay O(1) through the blocks; embeddings are
    N(0, 1); the head is N(0, 9 / d_model) so logits have a standard deviation near 3 (few near-ties);
    norm weights are 1 + N(0, 0.1^2). Head rows at or beyond vocab_size (padding up to embedding_size)
    are zero, so padded ids have logit 0 and practically never win.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    out: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            out[name] = 1.0 + normal(shape, 0.1)
        elif name.endswith("wte.weight"):
            out[name] = normal(shape, 1.0)
        elif name == PREFIX + "ff_out.weight":
            out[name] = normal(shape, 3.0 / math.sqrt(shape[1]))
        else:
            # q/k get a larger gain so attention is far from uniform and positions matter.
            gain = 2.0 if (".q_proj." in name or ".k_proj." in name) else 1.0
            out[name] = normal(shape, gain / math.sqrt(shape[1]))
    if not config["weight_tying"]:
        out[PREFIX + "ff_out.weight"][config["vocab_size"]:] = 0.0
    return out


def write_model_dir(model_dir: str, config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                    shards: int = 1) -> None:
    """Writes config.json and model.safetensors (or `shards` files plus model.safetensors.index.json).

    1-d norm weights are stored in the same dtype as the matrices, as in real bf16 checkpoints.
    """
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    converted = {name: t.to(dtype) for name, t in weights.items()}
    metadata = {"format": "pt"}
    if shards == 1:
        safetensors_io.save(os.path.join(model_dir, "model.safetensors"), converted, metadata)
        return
    names = list(converted)
    per_shard = math.ceil(len(names) / shards)
    groups = [{n: converted[n] for n in names[k * per_shard:(k + 1) * per_shard]} for k in range(shards)]
    safetensors_io.save_sharded(model_dir, groups, metadata)
