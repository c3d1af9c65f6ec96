"""The reference's one rule for a product with a checkpoint weight matrix (every model file uses this module).

* Weight stored as **bf16** in the checkpoint: the f32 activations are first rounded to bf16 (round to nearest
  even), then multiplied with the weight (upcast exactly to f32), products accumulated in f32. Since a bf16 x bf16
  product is exact in f32, this is llama.cpp's semantics and what the CPU's `vdpbf16ps` computes; the native
  engine does it on every CPU path.
* Weight stored as f32 or f16: the f32 activations times the exactly widened weight, in f32 (unchanged).

It covers the q/k/v/o projections (fused QKV too), the dense MLP gate/up/down, MoE experts and the shared expert,
and the LM head (a tied head reads the embedding matrix, so it follows the embedding's stored dtype). A bias is
added after the product, in f32. Outside the rule (always f32 activations, f32 arithmetic, whatever the stored
dtype): the MoE router's product (LLaDA2 and Qwen3-MoE compute router logits in fp32), attention scores Q.K^T
and P.V, RMSNorm / QK-norm, RoPE, the embedding lookup.
"""
from __future__ import annotations

import contextlib

import torch

_noise: list = []  # [generator, rel] while activation_noise() is active


@contextlib.contextmanager
def activation_noise(seed: int, rel: float):
    """For the fixture writers' robustness trials only: inside, every activation is multiplied by 1 + rel * N(0, 1)
    just before its bf16 rounding, which is what another implementation's f32 summation order does to it (the
    rounding is discontinuous: one input crossing a bf16 midpoint moves the result by a bf16 ulp, and that spreads)."""
    _noise[:] = [torch.Generator().manual_seed(seed), rel]
    try:
        yield
    finally:
        _noise.clear()


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """f32 -> nearest bf16 (ties to even) -> back to f32 (exact)."""
    if _noise:
        x = x * (1 + _noise[1] * torch.randn(x.shape, generator=_noise[0]))
    return x.to(torch.bfloat16).to(torch.float32)


def upcast(weights: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Checks that every name of `shapes` is present with that shape; returns (the tensors upcast to f32, which is
    exact from bf16 and f16, and the set of names that were stored as bf16)."""
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ValueError(f"missing tensors: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    stored_bf16 = set()
    for name, shape in shapes.items():
        t = weights[name]
        if list(t.shape) != shape:
            raise ValueError(f"{name}: shape {list(t.shape)}, expected {shape}")
        if t.dtype == torch.bfloat16:
            stored_bf16.add(name)
        out[name] = t.to(torch.float32).contiguous()
    return out, frozenset(stored_bf16)


def linear(x: torch.Tensor, weight: torch.Tensor, stored_bf16: bool) -> torch.Tensor:
    """x [..., in] f32 @ weight[out, in]^T -> [..., out] f32, x rounded to bf16 first when the weight was stored bf16."""
    return (round_bf16(x) if stored_bf16 else x) @ weight.T
