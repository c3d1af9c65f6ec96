"""Writes the golden fixtures of Dream generation with a template (structured output's JSON skeleton laid on the
canvas: dream_generate.py), on the tiny models make_dream_fixtures.py wrote.

    nice -n 10 /usr/bin/python3 tools/reference/make_dream_template_fixtures.py [--dir test/fixtures/golden-dream]

For gqa and nobias: <dir>/<name>-template.json, {"model", "generate": [case, ...]}, each case as in <name>.json
(answer, commits per step, trace) plus its "template" (gen_length entries, -1 where the model writes);
"first_eos" is -1 (no end token finishes a templated answer: it runs to the template's end). One case per
deterministic algorithm. Kept only when robust (make_dream_fixtures.py's margins and perturbation trials).
Deterministic: same script, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dream  # noqa: E402
import dream_generate as dg  # noqa: E402
import make_dream_fixtures as mdf  # noqa: E402

# name, prompt length, params, the answer positions fixed by the template (ids 10, 11, ... by position)
CASES = [
    ("template_maskgit", 5, dict(alg="maskgit_plus", gen_length=14, steps=6), [0, 1, 2, 6, 7, 12, 13]),
    ("template_margin", 4, dict(alg="topk_margin", gen_length=12, steps=4), [0, 5, 6, 11]),
    ("template_entropy", 6, dict(alg="entropy", gen_length=16, steps=16), [0, 1, 4, 8, 9, 10, 15]),
]
MODELS = ["gqa", "nobias"]


def make_case(model, config, name, prompt_len, raw, fixed, case_seed) -> dict:
    params = dg.DreamParams(**raw)
    mask = config["mask_token_id"]
    template = [10 + q % 5 if q in fixed else -1 for q in range(params.gen_length)]
    for attempt in range(mdf.MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = mdf.ordinary_tokens(rng, prompt_len, config)
        result = dg.generate(model, prompt, params, mask, margins=True, template=template)
        if mask in result.answer or not mdf.robust(model, config, prompt, params, result, template):
            continue
        assert all(result.answer[q] == t for q, t in enumerate(template) if t != -1)
        assert all(template[pos] == -1 for step in result.trace for pos, _, _, _ in step)
        return {
            "name": name,
            "prompt": prompt,
            "template": template,
            "params": {"gen_length": params.gen_length, "steps": params.steps, "alg": params.alg, "alg_temp": 0,
                       "temperature": 0, "top_p": params.top_p, "top_k": params.top_k, "eps": params.eps},
            "answer": result.answer,
            "first_eos": -1,
            "counts": result.counts,
            "trace": [[[pos, tok, mdf.sig6(prob), mdf.sig6(conf)] for pos, tok, prob, conf in step]
                      for step in result.trace],
            "prompt_seed_attempt": attempt,
        }
    raise RuntimeError(f"no robust prompt for case {name} in {mdf.MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--dir", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures",
                                                                       "golden-dream")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for index, name in enumerate(MODELS):
        model = dream.Dream.load(os.path.join(args.dir, name))
        with open(os.path.join(args.dir, name, "config.json")) as f:
            config = dream.normalize_config(json.load(f))
        cases = [make_case(model, config, case_name, prompt_len, params, fixed, 700 + 10 * index + k)
                 for k, (case_name, prompt_len, params, fixed) in enumerate(CASES)]
        with open(os.path.join(args.dir, f"{name}-template.json"), "w") as f:
            json.dump({"model": name, "generate": cases}, f, separators=(",", ":"))
            f.write("\n")
        tries = {c["name"]: c["prompt_seed_attempt"] for c in cases}
        counts = {c["name"]: c["counts"] for c in cases}
        print(f"{name}: {len(cases)} template cases, prompt seed attempts {tries}, commits per step {counts}")


if __name__ == "__main__":
    main()
