"""An independent PyTorch implementation of the LLaDA2 MoE forward (`model_type: "llada2_moe"`), in float32,
and the pieces the block-diffusion families share (block-causal attention with an exact KV cache).

Written from the public descriptions of LLaDA2.0 (BailingMoeV2 layout; see shared/specs/block-diffusion.md A2/A3).
Everything runs in float32 (bf16/f16 weights are upcast exactly), with one rule for the products with a weight
matrix stored as bf16 (fused QKV, dense, the MLPs, experts, shared expert, lm_head, also a tied head over bf16
embeddings): the activations are rounded to bf16 first (matmul.py, the rule the native engine follows). The router's
product stays f32 whatever the gate's stored dtype (router logits are computed in fp32), as do attention scores,
P.V, the norms, RoPE and the embedding lookup.

Per layer, pre-norm:
    h = x + dense(attention(...))                 on n = rms(x) * input_layernorm
    x = h + mlp(rms(h) * post_attention_layernorm)
logits = lm_head(rms(x) * model.norm), same position (unshifted).

Attention: qkv = query_key_value(n) viewed as [L, nq + 2 nkv, head_dim] and split [nq | nkv | nkv]; QK-norm
(RMSNorm over head_dim with query_layernorm / key_layernorm) BEFORE RoPE; RoPE is NeoX rotate-half over the
first rotary_dim = head_dim * partial_rotary_factor dims of each head only (pairs (i, i + rotary_dim / 2),
inverse frequencies theta^(-2i / rotary_dim)); the other dims pass through. Scores scaled by head_dim^-0.5,
GQA (query head h reads kv head h // (nq / nkv)), additive 0/-inf block-causal mask, softmax in float32.

MLP: layers i < first_k_dense_replace are dense SwiGLU (intermediate_size). The others are MoE:
    router: r = n @ gate^T (f32, never bf16-rounded); s = sigmoid(r); s_b = s + expert_bias (selection only);
            group score = sum of the top 2 of s_b in each of n_group contiguous groups; keep the topk_group best
            groups; idx = top num_experts_per_tok of s_b over the kept groups;
            w = s[idx] (unbiased), w = w / (sum w + 1e-20) (only when top_k > 1), w *= routed_scaling_factor
    y = sum_k w_k * expert_idx_k(n) + shared_experts(n)   (shared width moe_intermediate_size * num_shared_experts)
Tokens are grouped by expert: one matrix product per active expert.
"""
from __future__ import annotations

import json
import math
import os

import torch

import safetensors_io
from matmul import linear, upcast

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces (also used by sdar.py)

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_tables(start: int, end: int, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [end - start, rotary_dim] for positions start..end-1; angles in float64, rounded to float32."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64) * 2.0 / rotary_dim))
    angles = torch.arange(start, end, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [L, heads, head_dim]; rotate-half over the first cos.shape[-1] dims, the rest unchanged."""
    rot = cos.shape[-1]
    half = rot // 2
    xr, rest = x[..., :rot], x[..., rot:]
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([out, rest], dim=-1)


def block_causal_bias(start: int, length: int, attention_block: int) -> torch.Tensor:
    """[length, start + length] additive mask: query at absolute position i sees key j iff
    j < min(start + length, (i // B + 1) * B) (blocks aligned at 0); B = 0: every key."""
    end = start + length
    if attention_block <= 0:
        return torch.zeros(length, end)
    i = torch.arange(start, end)[:, None]
    j = torch.arange(end)[None, :]
    visible = j < ((i // attention_block) + 1) * attention_block
    bias = torch.zeros(length, end)
    bias.masked_fill_(~visible, NEG_INF)
    return bias


class KVCache:
    """Per layer post-norm, post-RoPE keys and the values of positions [0, length), [n_kv, length, head_dim]."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [L, nq, hd], k/v [T, nkv, hd], bias [L, T] -> [L, nq * hd]. Eager, float32 softmax."""
    nq, nkv, hd = q.shape[1], k.shape[1], q.shape[2]
    qh = q.transpose(0, 1)  # [nq, L, hd]
    kh = k.transpose(0, 1).repeat_interleave(nq // nkv, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(nq // nkv, dim=0)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd) + bias
    out = torch.softmax(scores, dim=-1) @ vh  # [nq, L, hd]
    return out.transpose(0, 1).reshape(q.shape[0], nq * hd)


def swiglu_shapes(shapes: dict[str, list[int]], prefix: str, hidden: int, d: int) -> None:
    """Adds the shapes of one SwiGLU MLP (gate, up [hidden, d]; down [d, hidden]) under `prefix`."""
    shapes[prefix + "gate_proj.weight"] = [hidden, d]
    shapes[prefix + "up_proj.weight"] = [hidden, d]
    shapes[prefix + "down_proj.weight"] = [d, hidden]


def run_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, expert) -> torch.Tensor:
    """sum_k weight[t, k] * expert(e = idx[t, k], x[t]); tokens grouped by expert, one product per active expert.
    expert(e, rows [n, D]) -> that expert's MLP output [n, D]."""
    out = torch.zeros_like(x)
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    token_of = order // idx.shape[1]
    sorted_experts = flat[order]
    experts, counts = torch.unique_consecutive(sorted_experts, return_counts=True)
    begin = 0
    for e, count in zip(experts.tolist(), counts.tolist()):
        rows = order[begin:begin + count]
        tokens = token_of[begin:begin + count]
        y = expert(e, x[tokens])
        w = weight.reshape(-1)[rows][:, None]
        out.index_add_(0, tokens, y * w)
        begin += count
    return out


class BlockLM:
    """The forward shared by the block-diffusion families. A subclass provides the tensor names (`shapes`),
    `project_qkv(layer, n) -> (q [L, nq, hd], k [L, nkv, hd], v)`, `qk_norm_names(layer)`, `mlp(layer, m)`,
    `attn_out_name(layer)`, and the config keys hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    rotary_dim, rope_theta, rms_norm_eps, num_hidden_layers, block_size."""

    EMBED = ""
    NORM = ""
    HEAD = "lm_head.weight"

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.config = config
        # f32 copies (exact from bf16 and f16) and the names stored as bf16 (their products round the input).
        self.w, self.bf16 = upcast(weights, self.tensor_shapes(config))
        self.head_name = self.EMBED if config["tie_word_embeddings"] else self.HEAD
        self.head = self.w[self.head_name]
        self.block_size = config["block_size"]
        self.router_gap = math.inf  # smallest selection margin seen by a router since the last reset

    @staticmethod
    def tensor_shapes(config: dict) -> dict[str, list[int]]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, tokens, start: int = 0, cache: KVCache | None = None, store: bool = False,
                attention_block: int | None = None) -> torch.Tensor:
        """tokens: ids at absolute positions [start, start + len) -> logits [len, vocab] float32.

        cache: the keys/values of [0, start) (required when start > 0); store: append this forward's keys/values
        to it. attention_block: B for block-causal (default the model's block_size), 0 for bidirectional."""
        return self.linear(self.hidden(tokens, start, cache, store, attention_block), self.head_name)

    @torch.no_grad()
    def hidden(self, tokens, start: int = 0, cache: KVCache | None = None, store: bool = False,
               attention_block: int | None = None) -> torch.Tensor:
        """As forward, but returns the final normalised hidden states [len, hidden_size] (what the head reads)."""
        c = self.config
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        length = tokens.shape[0]
        end = start + length
        if end > c["max_position_embeddings"]:
            raise ValueError(f"position {end} exceeds max_position_embeddings {c['max_position_embeddings']}")
        if cache is None:
            if start != 0:
                raise ValueError("start > 0 needs a cache holding [0, start)")
            if store:
                raise ValueError("store needs a cache")
        elif cache.length != start:
            raise ValueError(f"cache holds [0, {cache.length}), forward starts at {start}")
        block = self.block_size if attention_block is None else attention_block
        eps = c["rms_norm_eps"]
        cos, sin = rope_tables(start, end, c["rotary_dim"], float(c["rope_theta"]))
        bias = block_causal_bias(start, length, block)

        x = self.w[self.EMBED][tokens]
        for layer in range(c["num_hidden_layers"]):
            n = rms_norm(x, self.w[self.layer_name(layer, "input_layernorm.weight")], eps)
            q, k, v = self.project_qkv(layer, n)
            q_norm, k_norm = self.qk_norm_names(layer)
            if q_norm is not None:
                q = rms_norm(q, self.w[q_norm], eps)
                k = rms_norm(k, self.w[k_norm], eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            keys, values = k, v
            if cache is not None and start > 0:
                keys = torch.cat([cache.k[layer].transpose(0, 1), k], dim=0)
                values = torch.cat([cache.v[layer].transpose(0, 1), v], dim=0)
            if store:
                new_k, new_v = k.transpose(0, 1), v.transpose(0, 1)
                cache.k[layer] = new_k if cache.k[layer] is None else torch.cat([cache.k[layer], new_k], dim=1)
                cache.v[layer] = new_v if cache.v[layer] is None else torch.cat([cache.v[layer], new_v], dim=1)
            attn = attend(q, keys, values, bias)
            x = x + self.linear(attn, self.attn_out_name(layer))
            m = rms_norm(x, self.w[self.layer_name(layer, "post_attention_layernorm.weight")], eps)
            x = x + self.mlp(layer, m)
        if store:
            cache.length = end
        return rms_norm(x, self.w[self.NORM], eps)

    __call__ = forward

    def new_cache(self) -> KVCache:
        return KVCache(self.config["num_hidden_layers"])

    @staticmethod
    def layer_name(layer: int, rest: str) -> str:
        return f"model.layers.{layer}.{rest}"

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ w[name]^T, x rounded to bf16 first when that weight was stored as bf16 (matmul.py)."""
        return linear(x, self.w[name], name in self.bf16)

    def swiglu(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """The SwiGLU MLP whose tensors are prefix + {gate,up,down}_proj.weight."""
        gate = self.linear(x, prefix + "gate_proj.weight")
        up = self.linear(x, prefix + "up_proj.weight")
        return self.linear(torch.nn.functional.silu(gate) * up, prefix + "down_proj.weight")


def note_gap(model: BlockLM, values: torch.Tensor, k: int) -> None:
    """Records the selection margin of a top-k over the last dim: the k-th largest minus the (k+1)-th."""
    if k >= values.shape[-1]:
        return
    top = values.topk(k + 1, dim=-1).values
    gap = top[..., k - 1] - top[..., k]
    finite = gap[torch.isfinite(gap)]
    if finite.numel():
        model.router_gap = min(model.router_gap, float(finite.min()))


# ---------------------------------------------------------------------------------------------------------------
# LLaDA2 (llada2_moe)

def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return normalize_config(json.load(f), f"{model_dir}/config.json")


def stop_ids(raw) -> list[int]:
    if raw is None:
        return []
    return [int(raw)] if isinstance(raw, int) else [int(t) for t in raw]


def normalize_config(raw: dict, where: str = "config") -> dict:
    """Checks the keys of an llada2_moe config.json and fills the defaults."""
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "rope_theta", "max_position_embeddings"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if raw.get("model_type", "llada2_moe") != "llada2_moe":
        raise ValueError(f"{where}: model_type {raw.get('model_type')} is not llada2_moe")
    c = dict(raw)
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    if c.get("head_dim") is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    if c.get("rotary_dim") is None:
        c["rotary_dim"] = int(c["head_dim"] * c.get("partial_rotary_factor", 1.0))
    elif "partial_rotary_factor" in c and int(c["head_dim"] * c["partial_rotary_factor"]) != c["rotary_dim"]:
        raise ValueError(f"{where}: rotary_dim and partial_rotary_factor disagree")
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("use_qk_norm", True)
    c.setdefault("first_k_dense_replace", 0)
    c.setdefault("num_experts", 0)
    c.setdefault("num_shared_experts", 0)
    c.setdefault("n_group", 1)
    c.setdefault("topk_group", 1)
    c.setdefault("routed_scaling_factor", 1.0)
    c.setdefault("moe_router_enable_expert_bias", True)
    c.setdefault("score_function", "sigmoid")
    c.setdefault("mask_token_id", 156895)
    c.setdefault("block_size", 32)
    c["stop_token_ids"] = stop_ids(c.get("eos_token_id"))
    if c["score_function"] != "sigmoid":
        raise ValueError(f"{where}: score_function {c['score_function']} is not supported")
    if c.get("use_qkv_bias") or c.get("use_bias"):
        raise ValueError(f"{where}: biases are not supported")
    if c["num_attention_heads"] % c["num_key_value_heads"] or c["rotary_dim"] % 2 or c["rotary_dim"] > c["head_dim"]:
        raise ValueError(f"{where}: bad head shapes")
    if c["num_experts"] and (c["num_experts"] % c["n_group"] or c["topk_group"] > c["n_group"]):
        raise ValueError(f"{where}: num_experts must divide into n_group groups, topk_group <= n_group")
    return c


class LLaDA2(BlockLM):
    EMBED = "model.word_embeddings.weight"
    NORM = "model.norm.weight"

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        super().__init__(config, weights)
        self.routing_tokens = 0     # router rows seen
        self.group_excluded = 0     # rows whose group limit changed the chosen experts

    @classmethod
    def load(cls, model_dir: str) -> "LLaDA2":
        return cls(read_config(model_dir), safetensors_io.load_dir(model_dir))

    @staticmethod
    def is_moe(c: dict, layer: int) -> bool:
        return c["num_experts"] > 0 and layer >= c["first_k_dense_replace"]

    @staticmethod
    def tensor_shapes(c: dict) -> dict[str, list[int]]:
        d, hd = c["hidden_size"], c["head_dim"]
        nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        shapes = {LLaDA2.EMBED: [c["vocab_size"], d]}
        for i in range(c["num_hidden_layers"]):
            b = f"model.layers.{i}."
            shapes[b + "input_layernorm.weight"] = [d]
            shapes[b + "attention.query_key_value.weight"] = [(nq + 2 * nkv) * hd, d]
            if c["use_qk_norm"]:
                shapes[b + "attention.query_layernorm.weight"] = [hd]
                shapes[b + "attention.key_layernorm.weight"] = [hd]
            shapes[b + "attention.dense.weight"] = [d, nq * hd]
            shapes[b + "post_attention_layernorm.weight"] = [d]
            if LLaDA2.is_moe(c, i):
                e, h = c["num_experts"], c["moe_intermediate_size"]
                shapes[b + "mlp.gate.weight"] = [e, d]
                if c["moe_router_enable_expert_bias"]:
                    shapes[b + "mlp.gate.expert_bias"] = [e]
                for x in range(e):
                    swiglu_shapes(shapes, b + f"mlp.experts.{x}.", h, d)
                if c["num_shared_experts"]:
                    hs = h * c["num_shared_experts"]
                    swiglu_shapes(shapes, b + "mlp.shared_experts.", hs, d)
            else:
                swiglu_shapes(shapes, b + "mlp.", c["intermediate_size"], d)
        shapes[LLaDA2.NORM] = [d]
        if not c["tie_word_embeddings"]:
            shapes[LLaDA2.HEAD] = [c["vocab_size"], d]
        return shapes

    def project_qkv(self, layer: int, n: torch.Tensor):
        c = self.config
        nq, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        qkv = self.linear(n, self.layer_name(layer, "attention.query_key_value.weight")).view(-1, nq + 2 * nkv, hd)
        return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]

    def qk_norm_names(self, layer: int):
        if not self.config["use_qk_norm"]:
            return None, None
        return (self.layer_name(layer, "attention.query_layernorm.weight"),
                self.layer_name(layer, "attention.key_layernorm.weight"))

    def attn_out_name(self, layer: int) -> str:
        return self.layer_name(layer, "attention.dense.weight")

    def route(self, layer: int, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m [T, D] -> (expert ids [T, k], weights [T, k]) by the grouped-sigmoid rule (module docstring)."""
        c = self.config
        b = self.layer_name(layer, "mlp.gate.")
        e, k, groups = c["num_experts"], c["num_experts_per_tok"], c["n_group"]
        scores = torch.sigmoid(m @ self.w[b + "weight"].T)  # f32 router: no bf16 rounding of m
        biased = scores + self.w[b + "expert_bias"] if c["moe_router_enable_expert_bias"] else scores
        group_scores = biased.view(-1, groups, e // groups).topk(2, dim=-1).values.sum(dim=-1)
        note_gap(self, group_scores, c["topk_group"])
        kept = torch.zeros_like(group_scores, dtype=torch.bool)
        kept.scatter_(1, group_scores.topk(c["topk_group"], dim=-1).indices, True)
        allowed = kept.repeat_interleave(e // groups, dim=1)
        masked = biased.masked_fill(~allowed, NEG_INF)
        note_gap(self, masked, k)
        idx = masked.topk(k, dim=-1).indices
        ungrouped = biased.topk(k, dim=-1).indices
        self.routing_tokens += idx.shape[0]
        self.group_excluded += int((idx.sort(dim=-1).values != ungrouped.sort(dim=-1).values).any(dim=-1).sum())
        weight = scores.gather(1, idx)
        if k > 1:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weight * c["routed_scaling_factor"]

    def mlp(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = self.layer_name(layer, "mlp.")
        if not self.is_moe(c, layer):
            return self.swiglu(m, b)
        idx, weight = self.route(layer, m)
        y = run_experts(m, idx, weight, lambda e, rows: self.swiglu(rows, f"{b}experts.{e}."))
        if c["num_shared_experts"]:
            y = y + self.swiglu(m, b + "shared_experts.")
        return y


# ---------------------------------------------------------------------------------------------------------------
# Random weights and model directories (both families)

def random_weights(shapes: dict[str, list[int]], seed: int, embed_name: str, head_name: str | None,
                   hidden: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights, scaled so activations stay O(1) and logits spread over several units.

    Matrices are N(0, gain^2 / fan_in) (q/k/qkv gain 2 so attention is far from uniform, router gain 3 so
    routing scores are spread); embeddings N(0, 1); the head N(0, 16 / hidden) (logit std near 4, so that
    softmax confidences cover (0, 1) and thresholds matter); norm weights 1 + N(0, 0.1^2); expert_bias
    N(0, 0.05^2), enough to change some selections."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("expert_bias"):
            out[name] = normal(shape, 0.05)
        elif len(shape) == 1:
            out[name] = 1.0 + normal(shape, 0.1)
        elif name == embed_name:
            out[name] = normal(shape, 1.0)
        elif name == head_name:
            out[name] = normal(shape, 4.0 / math.sqrt(hidden))
        else:
            gain = 1.0
            if any(t in name for t in ("query_key_value", "q_proj", "k_proj")):
                gain = 2.0
            elif name.endswith("mlp.gate.weight"):
                gain = 3.0
            out[name] = normal(shape, gain / math.sqrt(shape[1]))
    return out


def write_model_dir(model_dir: str, config: dict, weights: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32) -> None:
    """config.json and one model.safetensors (expert_bias always float32, as sglang keeps it)."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    converted = {n: (t if n.endswith("expert_bias") else t.to(dtype)) for n, t in weights.items()}
    safetensors_io.save(os.path.join(model_dir, "model.safetensors"), converted, {"format": "pt"})
