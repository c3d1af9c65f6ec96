"""Writes the golden fixtures: tiny LLaDA-architecture models and what the PyTorch reference computes on them.

    nice -n 10 /usr/bin/python3 tools/reference/make_fixtures.py [--out test/fixtures/golden]

For each model: <out>/<name>/ (config.json + model.safetensors, or two shards and an index) and
<out>/<name>.json with forward logits, generate() cases (answer + per-step trace) and the groups of cases the
native test runs together in one engine batch. Everything is deterministic: same script, same bytes.

Every generate case is checked for robustness before it is written (see README.md): its minimum top-1/top-2
logit gap at committed tokens and its minimum log-confidence gap at the top-k boundary must reach MARGIN, and
PERTURB_TRIALS re-runs with the logits multiplied by (1 + PERTURB_REL * N(0, 1)) must give the same answer and
the same commit order; for a model with bf16-stored weights, so must ACTIVATION_TRIALS re-runs with every activation
multiplied by (1 + ACTIVATION_NOISE_REL * N(0, 1)) before its bf16 rounding (matmul.activation_noise). A case that
fails is re-drawn with the next prompt seed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as gen  # noqa: E402
import llada  # noqa: E402
import matmul  # noqa: E402

MARGIN = 2e-3          # logits (absolute) and log-confidence; f32 summation-order noise is ~1e-5
PERTURB_REL = 1e-4
PERTURB_TRIALS = 3
ACTIVATION_NOISE_REL = 1e-6  # bf16 models: f32 noise before the bf16 input rounding (flips a rounding now and then)
ACTIVATION_TRIALS = 50
MAX_SEEDS = 400
SPECIAL_SHARE = 0.12   # how often EOS (and EOT) should win the argmax at a masked position

EXTRA_KEYS = {  # keys a real LLaDA config.json carries that the native loader should ignore
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "activation_type": "silu",
    "block_type": "llama", "layer_norm_type": "rms", "rope": True, "alibi": False,
}


def model_config(vocab, d_model, n_heads, n_layers, hidden, theta, eps, max_len=256, n_kv_heads=None,
                 embedding_size=None, weight_tying=False):
    c = {"d_model": d_model, "n_heads": n_heads}
    if n_kv_heads is not None:
        c["n_kv_heads"] = n_kv_heads
    c.update({"n_layers": n_layers, "mlp_hidden_size": hidden, "vocab_size": vocab})
    if embedding_size is not None:
        c["embedding_size"] = embedding_size
    c.update({"mask_token_id": vocab - 1, "eos_token_id": vocab - 2, "rope_theta": theta, "rms_norm_eps": eps,
              "max_sequence_length": max_len, "weight_tying": weight_tying, "include_bias": False})
    c.update(EXTRA_KEYS)
    return c


# name, config, stored dtype, shard count, weight seed
MODELS = [
    ("plain", model_config(96, 48, 4, 2, 96, 500000.0, 1e-5, n_kv_heads=4, embedding_size=96), torch.float32, 1, 11),
    # GQA, and an LM head padded past the vocabulary (rows 120..127 are zero), as OLMo-style checkpoints do.
    ("gqa", model_config(120, 32, 4, 2, 80, 10000.0, 1e-6, n_kv_heads=2, embedding_size=128), torch.float32, 1, 12),
    # Odd sizes; n_kv_heads and embedding_size absent (they default to n_heads and vocab_size).
    ("odd", model_config(101, 36, 3, 3, 70, 10000.0, 1e-5), torch.float32, 1, 13),
    ("bf16", model_config(128, 64, 4, 2, 128, 500000.0, 1e-5, n_kv_heads=4), torch.bfloat16, 1, 14),
    # f16 with multi-query attention (one kv head) and a tied head (the LM head is wte).
    ("f16", model_config(64, 32, 2, 2, 96, 10000.0, 1e-5, n_kv_heads=1, weight_tying=True), torch.float16, 1, 15),
    ("sharded", model_config(80, 40, 2, 2, 64, 500000.0, 1e-5, n_kv_heads=2), torch.float32, 2, 16),
]

# name, prompt length, params (eot_token_id added per model)
CASES = [
    ("blocks", 5, dict(gen_length=16, block_length=4, steps=8)),                  # 4 blocks, 2 tokens a step
    ("single_block", 9, dict(gen_length=12, block_length=12, steps=12)),          # steps == gen_length
    ("few_steps", 3, dict(gen_length=12, block_length=12, steps=3)),              # 4 tokens a step
    ("cfg", 7, dict(gen_length=8, block_length=4, steps=8, cfg_scale=1.5)),
    ("logits_eos_inf", 4, dict(gen_length=12, block_length=6, steps=6, logits_eos_inf=True)),
    ("confidence_eos_eot_inf", 6, dict(gen_length=12, block_length=12, steps=6, confidence_eos_eot_inf=True)),
    ("non_divisible", 8, dict(gen_length=10, block_length=4, steps=7)),           # blocks 4,4,2; steps 3,2,2
    ("gen_length_1", 2, dict(gen_length=1, block_length=1, steps=1)),
    ("uneven_steps", 11, dict(gen_length=12, block_length=12, steps=5)),         # commits 3,3,2,2,2
    ("steps_over_length", 4, dict(gen_length=6, block_length=3, steps=10)),      # 5 a block, clamped to 3
    ("steps_under_blocks", 6, dict(gen_length=10, block_length=3, steps=3)),     # blocks 3,3,3,1; 1 step each
    ("cfg_eos_options", 5, dict(gen_length=8, block_length=8, steps=4, cfg_scale=0.5, logits_eos_inf=True,
                                confidence_eos_eot_inf=True)),
]

BATCHES = [
    ["blocks", "single_block", "cfg", "logits_eos_inf"],
    ["few_steps", "confidence_eos_eot_inf", "non_divisible", "gen_length_1", "cfg_eos_options"],
    ["uneven_steps", "steps_over_length", "steps_under_blocks", "blocks", "cfg"],
]


def sig6(v: float) -> float:
    return float(f"{v:.6g}")


def special_ids(config):
    vocab = config["vocab_size"]
    return {"mask": vocab - 1, "eos": vocab - 2, "eot": vocab - 3}


def random_tokens(rng: torch.Generator, count: int, vocab: int) -> list[int]:
    """Ordinary tokens only (no mask/EOS/EOT)."""
    return torch.randint(0, vocab - 3, (count,), generator=rng).tolist()


def fixture_weights(raw_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """random_weights, with the head rows of the special tokens adjusted so that generation exercises them:

    * the mask row is scaled down so the mask token is (almost) never predicted. With a tied head this row is
      also the mask embedding, which then adds little to the residual stream: without that a tied model just
      predicts its input (the mask) back;
    * the EOS and EOT rows get a multiple of the mean final hidden state at masked positions added, the
      multiple chosen by bisection so that each wins the argmax at about SPECIAL_SHARE of masked positions of
      random probe canvases; otherwise whether the EOS options ever matter depends on luck.
    """
    config = llada.normalize_config(raw_config)
    weights = llada.random_weights(config, seed)
    ids = special_ids(config)
    head = weights[llada.PREFIX + ("wte.weight" if config["weight_tying"] else "ff_out.weight")]
    head[ids["mask"]] *= 0.05 if config["weight_tying"] else 0.1

    rng = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, config["vocab_size"] - 3, (32, 24), generator=rng)
    probe[:, 8:] = ids["mask"]
    hidden = llada.LLaDA(config, weights).hidden(probe)[:, 8:].reshape(-1, config["d_model"])
    direction = hidden.mean(dim=0)
    direction /= direction.norm()
    for token in (ids["eos"], ids["eot"]):
        row = head[token].clone()
        others = hidden @ torch.cat([head[:token], head[token + 1:]]).T
        best_other = others.max(dim=1).values
        low, high = -50.0, 50.0
        for _ in range(60):
            mid = (low + high) / 2
            share = ((hidden @ (row + mid * direction)) > best_other).float().mean().item()
            low, high = (mid, high) if share < SPECIAL_SHARE else (low, mid)
        head[token] = row + high * direction
    return weights


def forward_cases(model: llada.LLaDA, config, seed: int) -> list[dict]:
    ids = special_ids(config)
    rng = torch.Generator().manual_seed(seed)
    out = []
    for length, masked in ((5, [3]), (11, [6, 7, 8, 9, 10]), (16, [1, 9, 10, 11, 12, 13, 14, 15])):
        tokens = random_tokens(rng, length, config["vocab_size"])
        for p in masked:
            tokens[p] = ids["mask"]
        if length == 11:
            tokens[2] = ids["eos"]  # a special token inside the prompt
        logits = model(torch.tensor([tokens]))[0]
        out.append({"tokens": tokens, "logits": [[sig6(v) for v in row] for row in logits.tolist()]})
    return out


def run_case(model, config, prompt, params, hook=None, template=None):
    ids = special_ids(config)
    return gen.generate(model, torch.tensor([prompt]), params, ids["mask"], ids["eos"], logits_hook=hook, margins=True,
                        template=template)


def perturbation(seed: int):
    noise_gen = torch.Generator().manual_seed(seed)

    def hook(logits):
        return logits * (1 + PERTURB_REL * torch.randn(logits.shape, generator=noise_gen))
    return hook


def without(params: gen.Params, **changes) -> gen.Params:
    return gen.Params(**{**params.__dict__, **changes})


def matters(model, config, prompt, params, result) -> bool:
    """Whether the EOS options of this case change anything, so the case actually tests them."""
    if not (params.logits_eos_inf or params.confidence_eos_eot_inf):
        return True
    plain = run_case(model, config, prompt, without(params, logits_eos_inf=False, confidence_eos_eot_inf=False))
    if params.logits_eos_inf and params.confidence_eos_eot_inf:
        # Both: each option alone must change the result, so neither one is untested.
        only_logits = run_case(model, config, prompt, without(params, confidence_eos_eot_inf=False))
        return only_logits.commits() != plain.commits() and only_logits.commits() != result.commits()
    if params.confidence_eos_eot_inf:
        # The option's purpose: an EOS/EOT prediction is committed as late as possible. Ask for one in the answer.
        answer = result.tokens[0, len(prompt):].tolist()
        ids = special_ids(config)
        if ids["eos"] not in answer and ids["eot"] not in answer:
            return False
    return plain.commits() != result.commits()


def robust(model, config, prompt, params, result, template=None) -> bool:
    if result.token_margin < MARGIN or result.select_margin < MARGIN:
        return False
    for trial in range(PERTURB_TRIALS):
        again = run_case(model, config, prompt, params, hook=perturbation(1000 + trial), template=template)
        if again.commits() != result.commits():
            return False
    for trial in range(ACTIVATION_TRIALS if model.bf16 else 0):
        with matmul.activation_noise(2000 + trial, ACTIVATION_NOISE_REL):
            again = run_case(model, config, prompt, params, template=template)
        if again.commits() != result.commits():
            return False
    return True


def make_case(model, config, name, prompt_len, raw_params, case_seed) -> dict:
    ids = special_ids(config)
    params = gen.Params(**raw_params, eot_token_id=ids["eot"])
    for attempt in range(MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = random_tokens(rng, prompt_len, config["vocab_size"])
        result = run_case(model, config, prompt, params)
        if not matters(model, config, prompt, params, result) or not robust(model, config, prompt, params, result):
            continue
        answer = result.tokens[0, prompt_len:].tolist()
        if any(t >= config["vocab_size"] or t == ids["mask"] for t in answer):
            continue  # predicting the mask token (or head padding) is undefined behaviour; not a fixture
        return {
            "name": name,
            "prompt": prompt,
            "params": {
                "gen_length": params.gen_length, "block_length": params.block_length, "steps": params.steps,
                "temperature": 0, "remasking": "low_confidence", "cfg_scale": params.cfg_scale,
                "logits_eos_inf": params.logits_eos_inf, "confidence_eos_eot_inf": params.confidence_eos_eot_inf,
                "eot_token_id": params.eot_token_id,
            },
            "answer": answer,
            "trace": [[[pos, tok, sig6(prob)] for pos, tok, prob in step] for step in result.trace[0]],
            "margins": {"token_logit_gap": sig6(result.token_margin),
                        "selection_log_confidence_gap": sig6(min(result.select_margin, 1e300))},
            "prompt_seed_attempt": attempt,
        }
    raise RuntimeError(f"no robust prompt for case {name} in {MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures", "golden")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    for index, (name, config, dtype, shards, seed) in enumerate(MODELS):
        model_dir = os.path.join(args.out, name)
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        llada.write_model_dir(model_dir, config, fixture_weights(config, seed), dtype=dtype, shards=shards)
        # Read back what was written: bf16/f16 fixtures are computed from the stored (rounded) weights.
        model = llada.LLaDA.load(model_dir)
        cases = [make_case(model, config, case_name, prompt_len, raw, 100 * index + k)
                 for k, (case_name, prompt_len, raw) in enumerate(CASES)]
        position = {c["name"]: i for i, c in enumerate(cases)}
        fixture = {
            "model": name,
            "eot_token_id": special_ids(config)["eot"],
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
