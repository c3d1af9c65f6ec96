"""Writes the golden fixtures of LLaDA generation with a template (structured output's JSON skeleton laid on the
canvas: generate.py), on the tiny models make_fixtures.py wrote.

    nice -n 10 /usr/bin/python3 tools/reference/make_template_fixtures.py [--dir test/fixtures/golden]

For plain and gqa: test/fixtures/golden-templates/<name>.json (beside <dir>), {"model", "generate": [case, ...]},
each case as in <dir>/<name>.json (answer, per-step trace) plus its "template" (gen_length entries, -1 where the model writes):
blocks of template tokens only (no step), blocks holding some (their steps over their masks), steps clamped to
the masks. Kept only when robust (make_fixtures.py's margins and perturbation trials). Deterministic: same
script, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as gen  # noqa: E402
import llada  # noqa: E402
import make_fixtures as mf  # noqa: E402

# name, prompt length, params, the answer positions fixed by the template (ids 10, 11, ... by position)
CASES = [
    # blocks of 4: [0-3] two fixed, [4-7] all fixed, [8-11] one fixed, [12-15] three fixed; 8 steps (2 a block)
    ("template_blocks", 5, dict(gen_length=16, block_length=4, steps=8), [0, 1, 4, 5, 6, 7, 10, 12, 13, 15]),
    # one block of 12 with 5 fixed, 12 steps clamped to its 7 masks
    ("template_single_block", 6, dict(gen_length=12, block_length=12, steps=12), [0, 3, 4, 8, 11]),
    # few steps: 3 steps over one block's 8 masks (3, 3, 2)
    ("template_few_steps", 4, dict(gen_length=12, block_length=12, steps=3), [2, 5, 6, 9]),
]
MODELS = ["plain", "gqa"]


def make_case(model, config, name, prompt_len, raw, fixed, case_seed) -> dict:
    ids = mf.special_ids(config)
    params = gen.Params(**raw, eot_token_id=ids["eot"])
    template = [10 + q % 5 if q in fixed else -1 for q in range(params.gen_length)]
    for attempt in range(mf.MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = mf.random_tokens(rng, prompt_len, config["vocab_size"])
        result = mf.run_case(model, config, prompt, params, template=template)
        if not mf.robust(model, config, prompt, params, result, template):
            continue
        answer = result.tokens[0, prompt_len:].tolist()
        if any(t >= config["vocab_size"] or t == ids["mask"] for t in answer):
            continue  # predicting the mask token (or head padding) is undefined behaviour; not a fixture
        assert all(answer[q] == t for q, t in enumerate(template) if t != -1)
        return {
            "name": name,
            "prompt": prompt,
            "template": template,
            "params": {
                "gen_length": params.gen_length, "block_length": params.block_length, "steps": params.steps,
                "temperature": 0, "remasking": "low_confidence", "cfg_scale": 0.0, "logits_eos_inf": False,
                "confidence_eos_eot_inf": False, "eot_token_id": params.eot_token_id,
            },
            "answer": answer,
            "trace": [[[pos, tok, mf.sig6(prob)] for pos, tok, prob in step] for step in result.trace[0]],
            "prompt_seed_attempt": attempt,
        }
    raise RuntimeError(f"no robust prompt for case {name} in {mf.MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--dir", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures", "golden")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = os.path.join(os.path.dirname(os.path.normpath(args.dir)), "golden-templates")
    os.makedirs(out, exist_ok=True)
    for index, name in enumerate(MODELS):
        with open(os.path.join(args.dir, name, "config.json")) as f:
            config = json.load(f)
        model = llada.LLaDA.load(os.path.join(args.dir, name))
        cases = [make_case(model, config, case_name, prompt_len, params, fixed, 900 + 10 * index + k)
                 for k, (case_name, prompt_len, params, fixed) in enumerate(CASES)]
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"model": name, "generate": cases}, f, separators=(",", ":"))
            f.write("\n")
        tries = {c["name"]: c["prompt_seed_attempt"] for c in cases}
        steps = {c["name"]: len(c["trace"]) for c in cases}
        print(f"{name}: {len(cases)} template cases, prompt seed attempts {tries}, steps {steps}")


if __name__ == "__main__":
    main()
