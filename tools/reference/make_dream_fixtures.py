"""Writes the Dream golden fixtures: tiny Dream-shaped models and what the PyTorch reference computes on them.

    nice -n 10 /usr/bin/python3 tools/reference/make_dream_fixtures.py [--out test/fixtures/golden-dream] [--only NAME]

For each model: <out>/<name>/ (config.json + model.safetensors) and <out>/<name>.json (format in README.md, section
"Dream"): forward logits of a few canvases (shifted predictions plus the raw output of the last position), generate
cases for the deterministic algorithms (maskgit_plus, topk_margin, entropy at temperature 0, alg_temp 0) with the
answer and the per-step trace, and the groups of cases the native test runs together in one engine batch.

Robustness (as make_fixtures.py): a case is kept only if its top-1/top-2 logit gaps at committed positions and its
selection gaps at the top-k boundary reach MARGIN, its top_p cut (when set) is at least TOP_P_MARGIN away from every
masked row's cumulative probabilities, PERTURB_TRIALS re-runs with the logits multiplied by (1 + PERTURB_REL *
N(0, 1)) give the same commits (for a model with bf16-stored weights also ACTIVATION_TRIALS re-runs with every
activation multiplied by (1 + ACTIVATION_NOISE_REL * N(0, 1)) before its bf16 rounding, matmul.activation_noise), it
never commits the mask id, and it shows what it is there for (an EOS inside the answer; top_p / top_k changing the
commits). Otherwise the next prompt seed is drawn.
Deterministic: same script, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dream  # noqa: E402
import dream_generate as dg  # noqa: E402
import matmul  # noqa: E402

MARGIN = 2e-3
TOP_P_MARGIN = 2e-4   # cumulative probabilities; float32 cumsum error is ~1e-7
COUNT_MARGIN = 1e-5    # n (1 - s/t) must not sit on an integer (it never does in practice; see README)
PERTURB_REL = 1e-4
PERTURB_TRIALS = 3
ACTIVATION_NOISE_REL = 1e-6  # bf16 models: f32 noise before the bf16 input rounding (flips a rounding now and then)
ACTIVATION_TRIALS = 50
MAX_SEEDS = 400
EOS_SHARE = 0.08       # how often EOS should win the argmax at a masked position

EXTRA_KEYS = {  # keys Dream-v0-Instruct-7B's config.json carries that a loader ignores
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "hidden_act": "silu", "initializer_range": 0.02, "rope_scaling": None, "sliding_window": None,
    "use_cache": False, "use_sliding_window": False, "transformers_version": "4.46.2",
}


def model_config(vocab, hidden, heads, kv_heads, layers, inter, theta, eps, tied, bias=None, dtype="float32"):
    c = {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": hidden,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
         "intermediate_size": inter, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": eps,
         "rope_theta": theta, "tie_word_embeddings": tied, "mask_token_id": vocab - 1, "pad_token_id": vocab - 2,
         "eos_token_id": vocab - 2, "bos_token_id": vocab - 2, "max_window_layers": layers, "torch_dtype": dtype}
    if bias is not None:
        c["attention_bias"] = bias
    c.update(EXTRA_KEYS)
    return c


# name, config, stored dtype, weight seed
MODELS = [
    ("gqa", model_config(128, 32, 4, 2, 2, 64, 1000000.0, 1e-6, False), torch.float32, 31),
    ("mha_tied", model_config(96, 40, 4, 4, 2, 64, 10000.0, 1e-6, True), torch.float32, 32),
    # No q/k/v bias (attention_bias false, the bias tensors absent), multi-query attention, three layers.
    ("nobias", model_config(112, 32, 4, 1, 3, 48, 1000000.0, 1e-5, False, bias=False), torch.float32, 33),
    ("bf16", model_config(128, 48, 4, 2, 2, 96, 1000000.0, 1e-6, False, dtype="bfloat16"), torch.bfloat16, 34),
]

# name, prompt length, params, what it must show ("eos": an EOS before the last answer position;
# "filter": top_p / top_k change the commits)
CASES = [
    ("maskgit_steps_eq_len", 5, dict(alg="maskgit_plus", gen_length=8, steps=8), []),      # commits 0,1,1,1,1,1,1,2
    ("maskgit_few_steps", 3, dict(alg="maskgit_plus", gen_length=12, steps=4), []),        # 2,3,3,4
    ("margin_basic", 7, dict(alg="topk_margin", gen_length=10, steps=5), []),              # 1,2,2,2,3
    ("margin_few_steps", 4, dict(alg="topk_margin", gen_length=16, steps=3), []),          # 5,5,6
    ("entropy_basic", 6, dict(alg="entropy", gen_length=12, steps=12), []),                # 0,1,...,1,2
    ("entropy_few_steps", 9, dict(alg="entropy", gen_length=9, steps=2), []),              # 4,5
    ("steps_over_length", 2, dict(alg="maskgit_plus", gen_length=6, steps=10), []),        # 0,0,0,0,0,1,1,1,1,2
    ("gen_length_1", 3, dict(alg="entropy", gen_length=1, steps=1), []),
    ("eos", 5, dict(alg="entropy", gen_length=16, steps=8), ["eos"]),                      # 1,2,2,2,2,2,2,3
    ("top_p", 4, dict(alg="maskgit_plus", gen_length=12, steps=6, top_p=0.8), ["filter"]),
    ("top_k", 6, dict(alg="topk_margin", gen_length=12, steps=4, top_k=4), ["filter"]),
    ("eps", 11, dict(alg="entropy", gen_length=24, steps=12, eps=0.05), []),               # 1,1,2,...,2,4
    ("entropy_top_p_top_k", 8, dict(alg="entropy", gen_length=10, steps=5, top_p=0.9, top_k=5), ["filter"]),
]

BATCHES = [
    ["maskgit_steps_eq_len", "margin_basic", "entropy_basic", "top_p", "gen_length_1"],
    ["maskgit_few_steps", "margin_few_steps", "entropy_few_steps", "eos", "top_k", "eps"],
    ["steps_over_length", "entropy_top_p_top_k", "maskgit_few_steps", "maskgit_few_steps", "margin_basic"],
]


def sig6(v: float) -> float:
    return float(f"{v:.6g}")


def finite(v: float) -> float:
    return sig6(min(v, 1e300))


def ordinary_tokens(rng: torch.Generator, count: int, config: dict) -> list[int]:
    """Ids below every special id (EOS/pad/bos = V-2, mask = V-1)."""
    return torch.randint(0, config["vocab_size"] - 2, (count,), generator=rng).tolist()


def fixture_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """dream.random_weights with the special rows adjusted so generation exercises them:
    * the mask row of the head is scaled down so the mask token is practically never predicted (tied: this is also
      the mask embedding);
    * the EOS row gets a multiple of the mean final hidden state added (at the rows that predict masked positions,
      i.e. one position to the left), chosen by bisection so EOS wins the argmax at about EOS_SHARE of them."""
    weights = dream.random_weights(config, seed)
    head = weights[dream.EMBED if config["tie_word_embeddings"] else dream.HEAD]
    mask, eos = config["mask_token_id"], config["eos_token_id"]
    head[mask] *= 0.1

    rng = torch.Generator().manual_seed(seed)
    model = dream.Dream(config, weights)
    hidden = []
    for _ in range(16):
        probe = ordinary_tokens(rng, 24, config)
        for i in range(8, 24):
            probe[i] = mask
        hidden.append(model.hidden(probe, attention_block=0)[7:23])  # rows predicting positions 8..23
    hidden = torch.cat(hidden)
    direction = hidden.mean(dim=0)
    direction /= direction.norm()
    row = head[eos].clone()
    others = hidden @ torch.cat([head[:eos], head[eos + 1:]]).T
    best_other = others.max(dim=1).values
    low, high = -50.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        share = ((hidden @ (row + mid * direction)) > best_other).float().mean().item()
        low, high = (mid, high) if share < EOS_SHARE else (low, mid)
    head[eos] = row + high * direction
    return weights


def forward_cases(model: dream.Dream, config: dict, seed: int) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    mask, eos = config["mask_token_id"], config["eos_token_id"]
    out = []
    for length, masked in ((5, [4]), (9, [5, 6, 7, 8]), (14, [1, 6, 7, 8, 10, 11, 12, 13])):
        tokens = ordinary_tokens(rng, length, config)
        for p in masked:
            tokens[p] = mask
        if length == 14:
            tokens[3] = eos  # a special token inside the prompt
        raw = model.raw_logits(tokens)
        shifted = dream.shift_logits(raw)
        out.append({"tokens": tokens,
                    "logits": [[sig6(v) for v in row] for row in shifted.tolist()],
                    "last_raw": [sig6(v) for v in raw[-1].tolist()]})
    return out


def perturbation(seed: int):
    noise_gen = torch.Generator().manual_seed(seed)

    def hook(logits):
        return logits * (1 + PERTURB_REL * torch.randn(logits.shape, generator=noise_gen))
    return hook


def shows(model, config, prompt, params, result, requirements) -> bool:
    for req in requirements:
        if req == "eos":
            first = result.first_eos([config["eos_token_id"]])
            if not 0 <= first < params.gen_length - 1:
                return False
        if req == "filter":
            plain = dg.generate(model, prompt, dg.DreamParams(**{**params.__dict__, "top_p": None, "top_k": None}),
                                config["mask_token_id"])
            if plain.commits() == result.commits():
                return False
            # each filter alone must matter too when both are set
            if params.top_p is not None and params.top_k is not None:
                for drop in ("top_p", "top_k"):
                    alone = dg.generate(model, prompt, dg.DreamParams(**{**params.__dict__, drop: None}),
                                        config["mask_token_id"])
                    if alone.commits() == result.commits():
                        return False
    return True


def robust(model, config, prompt, params, result, template=None) -> bool:
    if min(result.token_margin, result.select_margin) < MARGIN or result.top_p_margin < TOP_P_MARGIN:
        return False
    if result.count_margin < COUNT_MARGIN:
        return False
    for trial in range(PERTURB_TRIALS):
        again = dg.generate(model, prompt, params, config["mask_token_id"], logits_hook=perturbation(1000 + trial),
                            template=template)
        if again.commits() != result.commits():
            return False
    for trial in range(ACTIVATION_TRIALS if model.bf16 else 0):
        with matmul.activation_noise(2000 + trial, ACTIVATION_NOISE_REL):
            again = dg.generate(model, prompt, params, config["mask_token_id"], template=template)
        if again.commits() != result.commits():
            return False
    return True


def make_case(model, config, name, prompt_len, raw, requirements, case_seed) -> dict:
    params = dg.DreamParams(**raw)
    assert params.deterministic
    mask = config["mask_token_id"]
    for attempt in range(MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = ordinary_tokens(rng, prompt_len, config)
        result = dg.generate(model, prompt, params, mask, margins=True)
        if mask in result.answer:
            continue  # predicting the mask token is undefined behaviour; not a fixture
        if not shows(model, config, prompt, params, result, requirements):
            continue
        if not robust(model, config, prompt, params, result):
            continue
        return {
            "name": name,
            "prompt": prompt,
            "params": {"gen_length": params.gen_length, "steps": params.steps, "alg": params.alg, "alg_temp": 0,
                       "temperature": 0, "top_p": params.top_p, "top_k": params.top_k, "eps": params.eps},
            "answer": result.answer,
            "first_eos": result.first_eos([config["eos_token_id"]]),
            "counts": result.counts,
            "trace": [[[pos, tok, sig6(prob), sig6(conf)] for pos, tok, prob, conf in step] for step in result.trace],
            "margins": {"token_logit_gap": finite(result.token_margin),
                        "selection_gap": finite(result.select_margin),
                        "top_p_gap": finite(result.top_p_margin),
                        "count_fraction_gap": finite(result.count_margin)},
            "prompt_seed_attempt": attempt,
        }
    raise RuntimeError(f"no robust prompt for case {name} in {MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures",
                                                                       "golden-dream")))
    parser.add_argument("--only", help="one model name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    for index, (name, raw, dtype, seed) in enumerate(MODELS):
        if args.only and args.only != name:
            continue
        config = dream.normalize_config(raw)
        model_dir = os.path.join(args.out, name)
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        dream.write_model_dir(model_dir, raw, fixture_weights(config, seed), dtype=dtype)
        # Read back what was written: the bf16 fixture is computed from the stored (rounded) weights.
        model = dream.Dream.load(model_dir)
        cases = [make_case(model, config, case_name, prompt_len, params, reqs, 100 * index + k)
                 for k, (case_name, prompt_len, params, reqs) in enumerate(CASES)]
        position = {c["name"]: i for i, c in enumerate(cases)}
        fixture = {
            "model": name,
            "model_type": "Dream",
            "mask_token_id": config["mask_token_id"],
            "eos_token_id": config["eos_token_id"],
            "forward": forward_cases(model, config, seed),
            "generate": cases,
            "batches": [[position[n] for n in batch] for batch in BATCHES],
        }
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
            f.write("\n")
        tries = {c["name"]: c["prompt_seed_attempt"] for c in cases}
        print(f"{name}: {len(cases)} cases, prompt seed attempts {tries}", flush=True)


if __name__ == "__main__":
    main()
