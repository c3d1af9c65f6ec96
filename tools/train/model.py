"""A trainable LLaDA mask predictor whose parameter names are exactly LLaDA-8B's tensor names.

`state_dict()` keys are `model.transformer.wte.weight`, `model.transformer.blocks.{i}.q_proj.weight`, ...,
`model.transformer.ff_out.weight`, so the trained weights load unchanged in tools/reference/llada.py and in
the native engine. Same semantics as LLaDA: pre-norm blocks, RMSNorm computed in float32, NeoX rotate-half
RoPE over the full head dimension, bidirectional attention scaled by 1/sqrt(head_dim), SwiGLU feed-forward
(silu(ff_proj x) * up_proj x -> ff_out), no biases, untied LM head.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def config_for(d_model, n_heads, n_layers, mlp_hidden_size, vocab_size, max_sequence_length, special_ids):
    """config.json contents with LLaDA's keys (special_ids: name -> id from the tokenizer)."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "n_layers": n_layers,
        "mlp_hidden_size": mlp_hidden_size,
        "vocab_size": vocab_size,
        "embedding_size": vocab_size,
        "max_sequence_length": max_sequence_length,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
        "include_bias": False,
        "mask_token_id": special_ids["mask"],
        "eos_token_id": special_ids["eos"],
        "bos_token_id": special_ids["bos"],
        "pad_token_id": special_ids["eos"],
    }


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h = c["d_model"], c["mlp_hidden_size"]
        self.n_heads = c["n_heads"]
        self.head_dim = d // self.n_heads
        self.attn_norm = RMSNorm(d, c["rms_norm_eps"])
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, c["rms_norm_eps"])
        self.ff_proj = nn.Linear(d, h, bias=False)  # the SwiGLU gate
        self.up_proj = nn.Linear(d, h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)

    def forward(self, x, cos, sin):
        b, length, d = x.shape
        n = self.attn_norm(x)
        q, k, v = (p(n).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Bidirectional: every position attends to every position (torch 1.13 has no fused SDPA).
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, d)
        x = x + self.attn_out(attn)
        m = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c["embedding_size"], c["d_model"])
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.ln_f = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.ff_out = nn.Linear(c["d_model"], c["embedding_size"], bias=False)  # untied LM head


class _Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = Transformer(c)


class LLaDA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = _Model(config)
        self.head_dim = config["d_model"] // config["n_heads"]
        self._init_weights()

    def _init_weights(self):
        # GPT-2 style: N(0, 0.02), residual output projections scaled down by depth.
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
            scale = 1.0 / math.sqrt(2 * self.config["n_layers"]) if residual_out else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def rope(self, length, device):
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.config["rope_theta"] ** (torch.arange(half, dtype=torch.float64) * 2.0 / self.head_dim))
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def forward(self, tokens):
        """tokens [B, L] -> logits [B, L, embedding_size]."""
        t = self.model.transformer
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        x = t.wte(tokens)
        for block in t.blocks:
            x = block(x, cos, sin)
        return t.ff_out(t.ln_f(x))
