"""An independent PyTorch implementation of the Dream forward (`model_type: "Dream"`, architectures
["DreamModel"]: Qwen2 weights trained as a masked diffusion LM), in float32.

Written from the semantics of the public Dream modelling code (HKUNLP/Dream, `modeling_dream.py` on the model
hub): the Qwen2 layout run bidirectionally.

Per layer, pre-norm:
    h = x + o_proj(attention(rope(q_proj(n) + bq), rope(k_proj(n) + bk), v_proj(n) + bv))   n = rms(x) * input_layernorm
    x = h + down_proj(silu(gate_proj(m)) * up_proj(m))                                        m = rms(h) * post_attention_layernorm
raw = lm_head(rms(x) * model.norm)   (lm_head is model.embed_tokens when tie_word_embeddings)

* q/k/v projections carry a bias (Qwen2 always has one; `attention_bias: false` in config.json means a checkpoint
  without them, which this reference also accepts), o_proj and the MLP have none;
* head_dim = hidden_size / num_attention_heads (Dream's attention derives it so; a `head_dim` key is rejected if it
  disagrees); GQA: query head h reads kv head h // (num_attention_heads / num_key_value_heads);
* RMSNorm x * rsqrt(mean(x^2) + rms_norm_eps) * w; NeoX rotate-half RoPE over the full head_dim with inverse
  frequencies rope_theta^(-2i/head_dim), positions 0..L-1 (angles in float64, tables rounded to float32);
* attention is bidirectional over the whole canvas (Dream passes is_causal=False, no mask unless left padding),
  scaled by 1/sqrt(head_dim), softmax in float32.
* precision: f32 throughout (bf16/f16 weights upcast exactly), except that a product with a weight matrix stored as
  bf16 (q/k/v/o, gate/up/down, lm_head or a tied bf16 embed_tokens) rounds its input activations to bf16 first
  (matmul.py, the rule the native engine follows); the q/k/v bias is added after the product, in f32. Attention,
  norms, RoPE and the embedding lookup are plain f32.

SHIFTED LOGITS. Dream keeps the autoregressive parent's output convention: the network's output at position i - 1
is the prediction for position i. Its sampler does `logits = cat([logits[:, :1], logits[:, :-1]], dim=1)`, so
prediction[0] = raw[0] and prediction[i] = raw[i - 1] for i >= 1 (the raw output of the last position is unused).
`shift_logits` is the one place that rule is written; `Dream.forward` returns the shifted predictions and
`Dream.raw_logits` the network's own rows.
"""
from __future__ import annotations

import json
import math
import os

import torch

import llada
import safetensors_io
from llada2 import BlockLM

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return normalize_config(json.load(f), f"{model_dir}/config.json")


def is_dream(raw: dict) -> bool:
    """How a loader recognises a Dream config.json: model_type "Dream" or "DreamModel" among architectures."""
    return raw.get("model_type") == "Dream" or "DreamModel" in (raw.get("architectures") or [])


def normalize_config(raw: dict, where: str = "config") -> dict:
    """Checks the keys of a Dream config.json and fills the defaults Dream's DreamConfig has."""
    if not is_dream(raw):
        raise ValueError(f"{where}: not a Dream config (model_type {raw.get('model_type')!r})")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    c = dict(raw)
    if c.get("num_key_value_heads") is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"{where}: hidden_size must divide by num_attention_heads")
    if c.get("head_dim") not in (None, head_dim):
        raise ValueError(f"{where}: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
    c["head_dim"] = head_dim
    c["rotary_dim"] = head_dim
    c.setdefault("rms_norm_eps", 1e-6)
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("max_position_embeddings", 32768)
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("attention_bias", True)
    c.setdefault("mask_token_id", 151666)
    c.setdefault("pad_token_id", 151643)
    c["block_size"] = 0  # bidirectional: BlockLM's attention_block 0
    if c.get("rope_scaling") not in (None, {}):
        raise ValueError(f"{where}: rope_scaling is not supported")
    if c.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {c['hidden_act']} is not supported")
    if c["num_attention_heads"] % c["num_key_value_heads"] or head_dim % 2:
        raise ValueError(f"{where}: bad head shapes")
    return c


def tensor_shapes(c: dict) -> dict[str, list[int]]:
    """Every tensor a checkpoint must hold, with its shape (HF names)."""
    d, hd, h = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {EMBED: [c["vocab_size"], d]}
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes[b + "input_layernorm.weight"] = [d]
        for name, rows in (("q_proj", nq * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            shapes[f"{b}self_attn.{name}.weight"] = [rows, d]
            if c["attention_bias"]:
                shapes[f"{b}self_attn.{name}.bias"] = [rows]
        shapes[b + "self_attn.o_proj.weight"] = [d, nq * hd]
        shapes[b + "post_attention_layernorm.weight"] = [d]
        shapes[b + "mlp.gate_proj.weight"] = [h, d]
        shapes[b + "mlp.up_proj.weight"] = [h, d]
        shapes[b + "mlp.down_proj.weight"] = [d, h]
    shapes[NORM] = [d]
    if not c["tie_word_embeddings"]:
        shapes[HEAD] = [c["vocab_size"], d]
    return shapes


def shift_logits(raw: torch.Tensor) -> torch.Tensor:
    """Dream's prediction rule over the position dim (-2): out[0] = raw[0], out[i] = raw[i - 1]."""
    return torch.cat([raw[..., :1, :], raw[..., :-1, :]], dim=-2)


class Dream(BlockLM):
    EMBED = EMBED
    NORM = NORM
    HEAD = HEAD

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        extra = [n for n in weights if n.endswith("_proj.bias")] if not config["attention_bias"] else []
        if extra:
            raise ValueError(f"attention_bias is false but the checkpoint holds {extra[:3]}")
        super().__init__(config, weights)

    @classmethod
    def load(cls, model_dir: str) -> "Dream":
        return cls(read_config(model_dir), safetensors_io.load_dir(model_dir))

    @staticmethod
    def tensor_shapes(config: dict) -> dict[str, list[int]]:
        return tensor_shapes(config)

    def project_qkv(self, layer: int, n: torch.Tensor):
        c = self.config
        hd = c["head_dim"]
        out = []
        for name, heads in (("q_proj", c["num_attention_heads"]), ("k_proj", c["num_key_value_heads"]),
                            ("v_proj", c["num_key_value_heads"])):
            b = self.layer_name(layer, f"self_attn.{name}.")
            y = self.linear(n, b + "weight")
            if c["attention_bias"]:  # added after the product, in f32
                y = y + self.w[b + "bias"]
            out.append(y.view(-1, heads, hd))
        return tuple(out)

    def qk_norm_names(self, layer: int):
        return None, None

    def attn_out_name(self, layer: int) -> str:
        return self.layer_name(layer, "self_attn.o_proj.weight")

    def mlp(self, layer: int, m: torch.Tensor) -> torch.Tensor:
        return self.swiglu(m, self.layer_name(layer, "mlp."))

    @torch.no_grad()
    def raw_logits(self, tokens) -> torch.Tensor:
        """tokens [L] -> the network's output rows [L, vocab] f32 (unshifted), bidirectional attention."""
        return BlockLM.forward(self, tokens, attention_block=0)

    @torch.no_grad()
    def forward(self, tokens, **_ignored) -> torch.Tensor:
        """tokens [L] -> predictions [L, vocab] f32: row i is the distribution for position i (shifted)."""
        return shift_logits(self.raw_logits(tokens))

    __call__ = forward


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights, scaled so activations stay O(1) and logits spread over several units.

    Matrices N(0, gain^2 / fan_in) (q/k gain 2 so attention is far from uniform); embeddings N(0, 1); the head
    N(0, 16 / hidden) (logit std near 4, so confidences cover (0, 1)); norm weights 1 + N(0, 0.1^2); q/k/v biases
    N(0, 0.5^2), large enough that dropping them changes every logit noticeably."""
    c = config
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    out: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(c).items():
        if name.endswith(".bias"):
            out[name] = normal(shape, 0.5)
        elif len(shape) == 1:
            out[name] = 1.0 + normal(shape, 0.1)
        elif name == EMBED:
            out[name] = normal(shape, 1.0)
        elif name == HEAD:
            out[name] = normal(shape, 4.0 / math.sqrt(c["hidden_size"]))
        else:
            gain = 2.0 if (".q_proj." in name or ".k_proj." in name) else 1.0
            out[name] = normal(shape, gain / math.sqrt(shape[1]))
    if c["tie_word_embeddings"]:
        # A tied head reads the embeddings: scale them like a head so logits keep a spread near 4.
        out[EMBED] = out[EMBED] * (4.0 / math.sqrt(c["hidden_size"]))
    return out


def write_model_dir(model_dir: str, config: dict, weights: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32) -> None:
    """config.json (as given) and one model.safetensors; 1-d weights (norms, biases) in the same dtype."""
    llada.write_model_dir(model_dir, config, weights, dtype=dtype)
