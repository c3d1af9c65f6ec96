"""Writes the golden fixtures of block decoding with a template (structured output's JSON skeleton laid on the
canvas: block_generate.py's rules), on the tiny models make_block_fixtures.py wrote.

    nice -n 10 /usr/bin/python3 tools/reference/make_block_template_fixtures.py [--dir test/fixtures/golden-block]

For llada2 and sdar: <dir>/<name>-template.json, {"model", "generate": [case, ...]}, each case as in <name>.json
(answer, per-step trace, block steps, forwards per phase, edits) plus its "template" (gen_length entries, -1 where
the model writes). The templates put whole blocks of template tokens before, between and after the blocks to
denoise, and blocks that hold some; one llada2 case edits (LLaDA2.1), where template tokens are never edited.
Cases are kept only when robust (make_block_fixtures.py's margins and perturbation trials) and when both forms
agree; otherwise the next prompt seed is drawn. Deterministic: same script, same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import block_generate as bg  # noqa: E402
import make_block_fixtures as mbf  # noqa: E402


def template_of(gen_length: int, runs: list[tuple[int, int]], base: int) -> list[int]:
    """-1 everywhere but the [start, end) runs, which hold ids base, base + 1, ... (ordinary tokens)."""
    out = [-1] * gen_length
    for start, end in runs:
        for q in range(start, end):
            out[q] = base + (q % 5)
    return out


# name, prompt length, params, template runs (answer positions fixed), what the case must show
CASES = {
    "llada2": [
        # B 8, prompt 5: block 0 holds the tail and answer 0-2; answer 3-10 (block 1) all template; block 2
        # half template; block 3 one template token; the last block template but its padding.
        ("template_blocks", 5, dict(gen_length=34, block_length=8, steps=8, threshold=0.6),
         [(1, 3), (3, 11), (11, 15), (20, 21), (27, 34)], ["no_eos"]),
        # The first answer block all template (committed after the prefill), quota only, few steps.
        ("template_leading", 8, dict(gen_length=24, block_length=8, steps=3, threshold=0.0),
         [(0, 8), (10, 12), (16, 17)], ["no_eos"]),
        ("template_editing", 9, dict(gen_length=24, block_length=8, steps=8, threshold=0.6, editing_threshold=0.5,
                                     max_post_steps=4), [(0, 3), (7, 15), (20, 22)], ["no_eos"]),
    ],
    "sdar": [
        # B 4, prompt 6: answer 0-1 in block 1 (1 template), 2-5 (block 2) all template, 6-9 with one, 10-13.
        ("template_blocks", 6, dict(gen_length=14, block_length=4, steps=4, threshold=0.6),
         [(1, 2), (2, 6), (7, 8), (10, 12), (13, 14)], ["no_eos"]),
        ("template_leading", 4, dict(gen_length=14, block_length=4, steps=2, threshold=0.0),
         [(0, 4), (5, 6), (8, 12), (13, 14)], ["no_eos"]),
    ],
}


def make_case(model, config, name, prompt_len, raw, runs, requirements, case_seed) -> dict:
    params = bg.BlockParams(**raw)
    mask = config["mask_token_id"]
    template = template_of(params.gen_length, runs, 10)
    for attempt in range(mbf.MAX_SEEDS):
        rng = torch.Generator().manual_seed(case_seed * 1000 + attempt)
        prompt = mbf.ordinary_tokens(rng, prompt_len, config)
        result = bg.generate(model, prompt, params, "cached", margins=True, template=template)
        if not mbf.shows(result, requirements, config["stop_token_ids"]):
            continue
        if not mbf.robust(model, prompt, params, result, template):
            continue
        if any(tok == mask for step in result.trace for _, tok, _ in step):
            continue
        checked, diff = bg.generate_checked(model, prompt, params, template=template)
        assert checked.commits() == result.commits()
        assert all(result.answer[q] == t for q, t in enumerate(template) if t != -1)
        return {
            "name": name,
            "prompt": prompt,
            "template": template,
            "params": {"gen_length": params.gen_length, "block_length": params.block_length, "steps": params.steps,
                       "threshold": params.threshold, "editing_threshold": params.editing_threshold,
                       "max_post_steps": params.max_post_steps},
            "answer": result.answer,
            "finished_eos": result.finished_eos,
            "block_steps": result.block_steps,
            "trace": [[[pos, tok, mbf.sig6(prob)] for pos, tok, prob in step] for step in result.trace],
            "forwards": result.forwards,
            "edits": result.edits,
            "cached_vs_recompute_max_abs_logit_diff": mbf.sig6(diff),
            "prompt_seed_attempt": attempt,
        }
    raise RuntimeError(f"no robust prompt for case {name} in {mbf.MAX_SEEDS} seeds")


def main():
    parser = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--dir", default=os.path.normpath(os.path.join(here, "..", "..", "test", "fixtures",
                                                                       "golden-block")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for index, (name, cases) in enumerate(CASES.items()):
        model = bg.load_model(os.path.join(args.dir, name))
        config = model.config
        out = [make_case(model, config, case_name, prompt_len, params, runs, reqs, 500 + 10 * index + k)
               for k, (case_name, prompt_len, params, runs, reqs) in enumerate(cases)]
        with open(os.path.join(args.dir, f"{name}-template.json"), "w") as f:
            json.dump({"model": name, "generate": out}, f, indent=1)
            f.write("\n")
        tries = {c["name"]: c["prompt_seed_attempt"] for c in out}
        steps = {c["name"]: c["block_steps"] for c in out}
        print(f"{name}: {len(out)} template cases, prompt seed attempts {tries}, block steps {steps}")


if __name__ == "__main__":
    main()
