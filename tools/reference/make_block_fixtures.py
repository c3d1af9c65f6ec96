"""Writes the block-diffusion golden fixtures: tiny llada2_moe / sdar / sdar_moe models and what the PyTorch
reference computes on them.

    nice -n 10 /usr/bin/python3 tools/reference/make_block_fixtures.py [--out test/fixtures/golden-block]

For each model: <out>/<name>/ (config.json + model.safetensors, f32) and <out>/<name>.json (format in README.md):
forward logits of a few canvases (bidirectional and block-causal), generate cases (answer, per-step trace,
forward counts per phase), and one batch of 8 cases the engine test runs together. Every case runs in the cached
and the full-recompute form, which must agree token for token (the largest logit difference is recorded).

Robustness (as make_fixtures.py): a case is kept only if its top-1/top-2 logit gaps at committed (and editable)
positions, its log-confidence gaps at quota top-k boundaries and at the thresholds reach MARGIN, every router
selection gap of every forward reaches ROUTER_MARGIN, PERTURB_TRIALS re-runs with the logits multiplied by
(1 + PERTURB_REL * N(0, 1)) give the same commits, and it shows what it is there for (threshold commits beyond
the quota, an edit, an EOS stop, or no early stop). Otherwise the next prompt seed is drawn.
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
import block_generate as bg  # noqa: E402
import llada2  # noqa: E402
import sdar  # noqa: E402

MARGIN = 2e-3
ROUTER_MARGIN = 1e-5   # router scores are O(1); f32 summation noise moves them by ~1e-7
PERTURB_REL = 1e-4
PERTURB_TRIALS = 3
MAX_SEEDS = 300
EOS_SHARE = 0.03       # how often each stop id should win the argmax at a masked position

LLADA2 = {
    "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"],
    "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 64, "moe_intermediate_size": 8, "num_experts": 16, "num_experts_per_tok": 4,
    "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True, "router_dtype": "fp32", "vocab_size": 128, "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5, "rope_scaling": None, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False,
    "use_sliding_window": False, "hidden_act": "silu", "pad_token_id": 125, "eos_token_id": 126,
    "mask_token_id": 127, "block_size": 8,
}
SDAR = {
    "model_type": "sdar", "architectures": ["SDARForCausalLM"],
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 64, "vocab_size": 96, "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "attention_bias": False,
    "use_sliding_window": False, "hidden_act": "silu", "bos_token_id": 94, "eos_token_id": [93, 94],
    "mask_token_id": 95, "block_size": 4,
}
SDAR_MOE = {
    "model_type": "sdar_moe", "architectures": ["SDARMoeForCausalLM"],
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 12,
    "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 96,
    "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "hidden_act": "silu",
    "eos_token_id": 94, "mask_token_id": 95, "block_size": 4,
}

# name, raw config, module class, weight seed
MODELS = [("llada2", LLADA2, llada2.LLaDA2, 21), ("sdar", SDAR, sdar.SDAR, 22), ("sdar_moe", SDAR_MOE, sdar.SDAR, 23)]

# name, prompt length, params, what the case must show:
#   "threshold" (some step committed more than its quota by the threshold), "edit" (an edit at an answer
#   position), "eos" (a stop id ended it before the last block, and not in the first block opened),
#   "stop_id:N" (the answer's only stop id is N), "no_eos" (no early stop; a stop id in the last block is allowed)
LLADA2_CASES = [
    ("aligned_threshold", 8, dict(gen_length=24, block_length=8, steps=8, threshold=0.6), ["threshold", "no_eos"]),
    ("tail_threshold", 5, dict(gen_length=27, block_length=8, steps=8, threshold=0.6), ["threshold", "no_eos"]),
    ("quota_only", 11, dict(gen_length=24, block_length=8, steps=8, threshold=0.0), ["no_eos"]),
    ("few_steps", 6, dict(gen_length=26, block_length=8, steps=3, threshold=0.0), ["no_eos"]),
    ("eos_stop", 7, dict(gen_length=32, block_length=8, steps=8, threshold=0.6), ["eos"]),
    ("partial_last_block", 3, dict(gen_length=22, block_length=8, steps=8, threshold=0.6), ["no_eos"]),
    ("editing", 9, dict(gen_length=24, block_length=8, steps=8, threshold=0.6, editing_threshold=0.5,
                        max_post_steps=4), ["edit", "no_eos"]),
    ("single_block", 2, dict(gen_length=5, block_length=8, steps=4, threshold=0.6), []),
    ("few_steps_threshold", 16, dict(gen_length=24, block_length=8, steps=4, threshold=0.6), ["threshold", "no_eos"]),
    ("editing_speed", 4, dict(gen_length=20, block_length=8, steps=8, threshold=0.5, editing_threshold=0.0,
                              max_post_steps=3), ["edit", "no_eos"]),
]
SDAR_CASES = [
    ("aligned_threshold", 8, dict(gen_length=12, block_length=4, steps=4, threshold=0.6), ["threshold", "no_eos"]),
    ("tail_threshold", 5, dict(gen_length=13, block_length=4, steps=4, threshold=0.6), ["threshold", "no_eos"]),
    ("quota_only", 7, dict(gen_length=12, block_length=4, steps=4, threshold=0.0), ["no_eos"]),
    ("few_steps", 6, dict(gen_length=14, block_length=4, steps=2, threshold=0.0), ["no_eos"]),
    ("eos_stop", 3, dict(gen_length=16, block_length=4, steps=4, threshold=0.6), ["eos"]),
    ("partial_last_block", 2, dict(gen_length=9, block_length=4, steps=4, threshold=0.6), ["no_eos"]),
    ("single_block", 1, dict(gen_length=3, block_length=4, steps=3, threshold=0.6), []),
    ("long_prompt", 13, dict(gen_length=8, block_length=4, steps=4, threshold=0.6), ["no_eos"]),
    ("few_steps_threshold", 12, dict(gen_length=12, block_length=4, steps=2, threshold=0.6), ["threshold", "no_eos"]),
]
CASES = {"llada2": LLADA2_CASES, "sdar": SDAR_CASES,
         "sdar_moe": [c for c in SDAR_CASES]}
EXTRA_REQUIREMENTS = {("sdar", "eos_stop"): ["stop_id:93"]}  # the second id of the eos list ends it
BATCH = {
    "llada2": ["aligned_threshold", "tail_threshold", "quota_only", "few_steps", "eos_stop", "partial_last_block",
               "editing", "single_block"],
    "sdar": ["aligned_threshold", "tail_threshold", "quota_only", "few_steps", "eos_stop", "partial_last_block",
             "single_block", "long_prompt"],
}
BATCH["sdar_moe"] = BATCH["sdar"]


def sig6(v: float) -> float:
    return float(f"{v:.6g}")


def ordinary_tokens(rng: torch.Generator, count: int, config: dict) -> list[int]:
    """Ids below every special id (stop ids, mask, pad sit at the top of the vocabulary)."""
    special = set(config["stop_token_ids"]) | {config["mask_token_id"]}
    if config.get("pad_token_id") is not None:
        special.add(config["pad_token_id"])
    low = min(special)
    return torch.randint(0, low, (count,), generator=rng).tolist()


def fixture_weights(cls, config: dict, seed: int) -> dict[str, torch.Tensor]:
    """random_weights with the special rows adjusted so generation exercises them:
    * the mask row of the head is scaled down so the mask token is practically never predicted (and the mask
      embedding too, so masked positions are shaped by their context more than by their own input);
    * each stop id's head row gets a multiple of the mean final hidden state at masked positions added, chosen by
      bisection so that it wins the argmax at about EOS_SHARE of masked positions of random probe canvases."""
    shapes = cls.tensor_shapes(config)
    head_name = None if config["tie_word_embeddings"] else cls.HEAD
    weights = llada2.random_weights(shapes, seed, cls.EMBED, head_name, config["hidden_size"])
    mask = config["mask_token_id"]
    weights[cls.EMBED][mask] *= 0.3
    head = weights[cls.EMBED if config["tie_word_embeddings"] else cls.HEAD]
    head[mask] *= 0.1

    rng = torch.Generator().manual_seed(seed)
    block = config["block_size"]
    model = cls(config, weights)
    hidden = []
    for _ in range(16):
        probe = ordinary_tokens(rng, 3 * block, config)
        for i in range(block + 1, 3 * block):
            probe[i] = mask
        hidden.append(model.hidden(probe, attention_block=block)[block + 1:])
    hidden = torch.cat(hidden)
    direction = hidden.mean(dim=0)
    direction /= direction.norm()
    for token in config["stop_token_ids"]:
        row = head[token].clone()
        others = hidden @ torch.cat([head[:token], head[token + 1:]]).T
        best_other = others.max(dim=1).values
        low, high = -50.0, 50.0
        for _ in range(60):
            mid = (low + high) / 2
            share = ((hidden @ (row + mid * direction)) > best_other).float().mean().item()
            low, high = (mid, high) if share < EOS_SHARE else (low, mid)
        head[token] = row + high * direction
    return weights


def forward_cases(model, config, seed: int) -> list[dict]:
    rng = torch.Generator().manual_seed(seed)
    block, mask = config["block_size"], config["mask_token_id"]
    out = []
    for length, prompt in ((block + 3, 5), (2 * block + 3, block + 1)):
        tokens = ordinary_tokens(rng, length, config)
        for i in range(prompt, length):
            tokens[i] = mask
        tokens[length - 2] = tokens[1]  # a committed token among the masks
        tokens[2] = config["stop_token_ids"][0]  # a special token inside the prompt
        for attention_block in (0, block):
            logits = model.forward(tokens, attention_block=attention_block)
            out.append({"tokens": tokens, "attention_block": attention_block,
                        "logits": [[sig6(v) for v in row] for row in logits.tolist()]})
    return out


def perturbation(seed: int):
    noise_gen = torch.Generator().manual_seed(seed)

    def hook(logits):
        return logits * (1 + PERTURB_REL * torch.randn(logits.shape, generator=noise_gen))
    return hook


def shows(result: bg.Result, requirements: list[str], stop_ids: list[int]) -> bool:
    for req in requirements:
        if req == "threshold" and result.threshold_commits == 0:
            return False
        if req == "edit" and result.edits == 0:
            return False
        if req == "eos" and not (result.stopped_early and len(result.block_steps) >= 2):
            return False
        if req == "no_eos" and result.stopped_early:
            return False
        if req.startswith("stop_id:"):
            wanted = int(req.split(":")[1])
            found = {t for t in result.answer if t in stop_ids}
            if found != {wanted}:
                return False
    return True


def robust(model, prompt, params, result, template=None) -> bool:
    if min(result.token_margin, result.select_margin, result.threshold_margin) < MARGIN:
        return False
    if result.router_margin < ROUTER_MARGIN:
        return False
    for trial in range(PERTURB_TRIALS):
        again = bg.generate(model, prompt, params, "cached", logits_hook=perturbation(1000 + trial), template=template)
        if again.commits() != result.commits() or again.block_steps != result.block_steps:
            return False
    return True


def finite(v: float) -> float:
    return sig6(min(v, 1e300))


def make_case(model, config, name, prompt_len, raw, requirements, case_seed) -> dict:
    params = bg.BlockParams(**raw)
    mask = config["mask_token_id"]
    for attempt in range(MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = ordinary_tokens(rng, prompt_len, config)
        result = bg.generate(model, prompt, params, "cached", margins=True)
        if not shows(result, requirements, config["stop_token_ids"]) or not robust(model, prompt, params, result):
            continue
        if any(tok == mask for step in result.trace for _, tok, _ in step):
            continue  # predicting the mask token is undefined behaviour; not a fixture
        checked, diff = bg.generate_checked(model, prompt, params)
        assert checked.commits() == result.commits()
        routing = None
        if isinstance(model, llada2.LLaDA2):
            model.routing_tokens = model.group_excluded = 0
            bg.generate(model, prompt, params, "cached")
            routing = {"tokens": model.routing_tokens, "group_excluded": model.group_excluded}
        case = {
            "name": name,
            "prompt": prompt,
            "params": {"gen_length": params.gen_length, "block_length": params.block_length, "steps": params.steps,
                       "threshold": params.threshold, "editing_threshold": params.editing_threshold,
                       "max_post_steps": params.max_post_steps},
            "answer": result.answer,
            "finished_eos": result.finished_eos,
            "stopped_early": result.stopped_early,
            "block_steps": result.block_steps,
            "trace": [[[pos, tok, sig6(prob)] for pos, tok, prob in step] for step in result.trace],
            "forwards": result.forwards,
            "edits": result.edits,
            "threshold_commits": result.threshold_commits,
            "cached_vs_recompute_max_abs_logit_diff": sig6(diff),
            "margins": {"token_logit_gap": finite(result.token_margin),
                        "selection_log_gap": finite(result.select_margin),
                        "threshold_log_gap": finite(result.threshold_margin),
                        "router_gap": finite(result.router_margin)},
            "prompt_seed_attempt": attempt,
        }
        if routing is not None:
            case["routing"] = routing
        return case
    raise RuntimeError(f"no robust prompt for case {name} in {MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures",
                                                                       "golden-block")))
    parser.add_argument("--only", help="one model name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    for index, (name, raw, cls, seed) in enumerate(MODELS):
        if args.only and args.only != name:
            continue
        config = (llada2.normalize_config if cls is llada2.LLaDA2 else sdar.normalize_config)(raw)
        model_dir = os.path.join(args.out, name)
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        llada2.write_model_dir(model_dir, raw, fixture_weights(cls, config, seed))
        model = cls.load(model_dir)
        cases = []
        for k, (case_name, prompt_len, params, reqs) in enumerate(CASES[name]):
            reqs = reqs + EXTRA_REQUIREMENTS.get((name, case_name), [])
            cases.append(make_case(model, config, case_name, prompt_len, params, reqs, 100 * index + k))
        position = {c["name"]: i for i, c in enumerate(cases)}
        fixture = {
            "model": name,
            "model_type": raw["model_type"],
            "block_size": config["block_size"],
            "mask_token_id": config["mask_token_id"],
            "eos_token_ids": config["stop_token_ids"],
        }
        if isinstance(model, llada2.LLaDA2):
            fixture["routing"] = {k: sum(c["routing"][k] for c in cases) for k in ("tokens", "group_excluded")}
        fixture["forward"] = forward_cases(model, config, seed)
        fixture["generate"] = cases
        fixture["batches"] = [[position[n] for n in BATCH[name]]]
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(fixture, f, separators=(",", ":"))
            f.write("\n")
        tries = {c["name"]: c["prompt_seed_attempt"] for c in cases}
        diff = max(c["cached_vs_recompute_max_abs_logit_diff"] for c in cases)
        print(f"{name}: {len(cases)} cases, prompt seed attempts {tries}, cached vs recompute max |dlogit| {diff:.3g}"
              + (f", routing {fixture['routing']}" if "routing" in fixture else ""), flush=True)


if __name__ == "__main__":
    main()
