"""An independent PyTorch implementation of the SDAR forward (Qwen3 layout, `model_type: "sdar"`) and of its MoE
variant (Qwen3-MoE layout, `model_type: "sdar_moe"`), in float32. See shared/specs/block-diffusion.md B2/B3.

Per layer, pre-norm, as in llada2.py. Attention: separate q_proj / k_proj / v_proj (q width heads * head_dim may
differ from hidden_size), QK-norm (q_norm / k_norm, RMSNorm over head_dim) before RoPE, NeoX rotate-half RoPE
over the full head_dim, GQA, o_proj; the block-causal mask and KV cache of llada2.BlockLM.

MLP: dense SwiGLU (intermediate_size), or, for sdar_moe layers that are sparse (num_experts > 0, layer not in
mlp_only_layers, (layer + 1) % decoder_sparse_step == 0), the Qwen3-MoE block:
    r = m @ gate^T (f32, never bf16-rounded); p = softmax(r); idx = top num_experts_per_tok of p; w = p[idx];
    if norm_topk_prob: w = w / sum w;   y = sum_k w_k * expert_idx_k(m)        (no shared expert, no bias)
Logits: lm_head (or embed_tokens when tie_word_embeddings), unshifted, float32 here (the official code keeps
them in the model dtype). The reference runs in f32 with one rule (matmul.py): a product with a weight matrix
stored as bf16 (q/k/v/o, dense MLP, experts, lm_head or a tied bf16 embedding) rounds its input activations to
bf16 first; the router, attention, norms and RoPE stay plain f32.
"""
from __future__ import annotations

import json
import os

import torch

import safetensors_io
from llada2 import BlockLM, note_gap, run_experts, stop_ids, swiglu_shapes


def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return normalize_config(json.load(f), f"{model_dir}/config.json")


def normalize_config(raw: dict, where: str = "config") -> dict:
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "rope_theta", "max_position_embeddings", "model_type"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    if raw["model_type"] not in ("sdar", "sdar_moe"):
        raise ValueError(f"{where}: model_type {raw['model_type']} is not sdar / sdar_moe")
    c = dict(raw)
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    if c.get("head_dim") is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    c["rotary_dim"] = c["head_dim"]
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("mask_token_id", 151669)
    c.setdefault("block_size", 4)
    c["stop_token_ids"] = stop_ids(c.get("eos_token_id"))
    if c.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias is not supported")
    if c["model_type"] == "sdar_moe":
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if k not in c:
                raise ValueError(f"{where} lacks {k}")
        c.setdefault("norm_topk_prob", True)
        c.setdefault("decoder_sparse_step", 1)
        c.setdefault("mlp_only_layers", [])
    else:
        c["num_experts"] = 0
    if c["num_attention_heads"] % c["num_key_value_heads"] or c["head_dim"] % 2:
        raise ValueError(f"{where}: bad head shapes")
    return c


class SDAR(BlockLM):
    EMBED = "model.embed_tokens.weight"
    NORM = "model.norm.weight"

    @classmethod
    def load(cls, model_dir: str) -> "SDAR":
        return cls(read_config(model_dir), safetensors_io.load_dir(model_dir))

    @staticmethod
    def is_moe(c: dict, layer: int) -> bool:
        return (c["num_experts"] > 0 and layer not in c.get("mlp_only_layers", [])
                and (layer + 1) % c.get("decoder_sparse_step", 1) == 0)

    @staticmethod
    def tensor_shapes(c: dict) -> dict[str, list[int]]:
        d, hd = c["hidden_size"], c["head_dim"]
        nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        shapes = {SDAR.EMBED: [c["vocab_size"], d]}
        for i in range(c["num_hidden_layers"]):
            b = f"model.layers.{i}."
            shapes[b + "input_layernorm.weight"] = [d]
            shapes[b + "self_attn.q_proj.weight"] = [nq * hd, d]
            shapes[b + "self_attn.k_proj.weight"] = [nkv * hd, d]
            shapes[b + "self_attn.v_proj.weight"] = [nkv * hd, d]
            shapes[b + "self_attn.q_norm.weight"] = [hd]
            shapes[b + "self_attn.k_norm.weight"] = [hd]
            shapes[b + "self_attn.o_proj.weight"] = [d, nq * hd]
            shapes[b + "post_attention_layernorm.weight"] = [d]
            if SDAR.is_moe(c, i):
                e, h = c["num_experts"], c["moe_intermediate_size"]
                shapes[b + "mlp.gate.weight"] = [e, d]
                for x in range(e):
                    swiglu_shapes(shapes, b + f"mlp.experts.{x}.", h, d)
            else:
                swiglu_shapes(shapes, b + "mlp.", c["intermediate_size"], d)
        shapes[SDAR.NORM] = [d]
        if not c["tie_word_embeddings"]:
            shapes[SDAR.HEAD] = [c["vocab_size"], d]
        return shapes

    def project_qkv(self, layer: int, n: torch.Tensor):
        c = self.config
        nq, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        b = self.layer_name(layer, "self_attn.")
        q = self.linear(n, b + "q_proj.weight").view(-1, nq, hd)
        k = self.linear(n, b + "k_proj.weight").view(-1, nkv, hd)
        v = self.linear(n, b + "v_proj.weight").view(-1, nkv, hd)
        return q, k, v

    def qk_norm_names(self, layer: int):
        return self.layer_name(layer, "self_attn.q_norm.weight"), self.layer_name(layer, "self_attn.k_norm.weight")

    def attn_out_name(self, layer: int) -> str:
        return self.layer_name(layer, "self_attn.o_proj.weight")

    def route(self, layer: int, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        k = c["num_experts_per_tok"]
        # f32 router (Qwen3-MoE computes router logits in fp32): no bf16 rounding of m.
        probs = torch.softmax(m @ self.w[self.layer_name(layer, "mlp.gate.weight")].T, dim=-1)
        note_gap(self, probs, k)
        weight, idx = probs.topk(k, dim=-1)
        if c["norm_topk_prob"]:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return idx, weight

    def mlp(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        b = self.layer_name(layer, "mlp.")
        if not self.is_moe(self.config, layer):
            return self.swiglu(m, b)
        idx, weight = self.route(layer, m)
        return run_experts(m, idx, weight, lambda e, rows: self.swiglu(rows, f"{b}experts.{e}."))
