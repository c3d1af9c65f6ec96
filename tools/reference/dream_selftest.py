"""Checks the Dream reference against things it must agree with. Exits non-zero on the first failure.

    /usr/bin/python3 tools/reference/dream_selftest.py

1. The forward of every golden-dream model against a second implementation in float64, written another way: one
   position and one head at a time, RoPE as rotations of (x[i], x[i + head_dim / 2]) pairs, GQA by index
   arithmetic, biases added per head, the prediction for position i read from the output row i - 1 by index, the
   input of every product with a bf16-stored weight rounded to bf16 (selftest.naive_round_bf16; bias after). The
   stored logits (shifted rows and the raw last row) are current. Dropping the q/k/v biases changes the logits of
   the models that have them (so a loader that ignores them fails).
2. The shift rule on a labelled tensor.
3. sample_tokens and the selection against naive loops over Python lists (sorting, cumulative top_p, top_k,
   softmax, the three confidences, top-k selection with ties to the lower position) on many random rows.
4. The count schedule: the canonical float32 timesteps (dream_generate.timesteps) within 1 ulp of torch.linspace;
   how many (gen_length, steps, eps) schedules change when the counts are computed from torch.linspace's values,
   from a fused-multiply-add linspace (what CUDA does) or in float64 on exact timesteps (reported, not a failure:
   it happens only where n (1 - s/t) is an exact integer in real arithmetic); no stored case depends on it.
5. Every stored generate case: a naive generate loop (Python lists, float64 math) reproduces the answer, the
   counts and the trace; dream_generate.generate does too (the fixtures are current).
6. The stochastic paths (origin; temperature > 0; alg_temp > 0) are reproducible per seed and change with it.
7. With --upstream PATH (Dream's generation_utils.py, e.g. from the Dream-org/Dream-v0-Instruct-7B model repository
   or a verbatim copy of it): `top_p_logits`, `top_k_logits`, `sample_tokens` and `DreamGenerationMixin._sample` are
   taken out of the file with `ast` (the rest needs transformers), read at run time and never copied here, and run
   with this reference's model as `self` (its __call__ returns the raw, unshifted logits; upstream shifts them);
   every stored case must give the stored answer. Upstream runs its float32 softmax and torch.linspace timesteps.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import types
import typing

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dream  # noqa: E402
import dream_generate as dg  # noqa: E402
from selftest import naive_round_bf16  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(HERE, "..", "..", "test", "fixtures", "golden-dream"))
MODELS = ["gqa", "mha_tied", "nobias", "bf16"]


def check(condition: bool, message: str) -> None:
    if not condition:
        print("FAIL:", message)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------------------
# 1. forward in float64, per position and head

def naive_raw_logits(model: dream.Dream, tokens: list[int]) -> torch.Tensor:
    c = model.config
    w = {k: v.double() for k, v in model.w.items()}
    nq, nkv, hd, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["hidden_size"]

    def mv(name, vec):  # w[name] @ vec, vec rounded to bf16 first when that weight was stored bf16
        if name in model.bf16:
            vec = torch.from_numpy(naive_round_bf16(vec.numpy()))
        return w[name] @ vec
    eps, theta = c["rms_norm_eps"], float(c["rope_theta"])
    length = len(tokens)

    def rms(v, weight):
        return v / math.sqrt(float((v * v).sum()) / v.numel() + eps) * weight

    def rotate(v, pos):
        out = v.clone()
        half = hd // 2
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / hd)
            a, b = float(v[i]), float(v[i + half])
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    xs = [w[dream.EMBED][t].clone() for t in tokens]
    for layer in range(c["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        normed = [rms(x, w[pre + "input_layernorm.weight"]) for x in xs]

        def proj(name, n):
            y = mv(f"{pre}self_attn.{name}.weight", n)
            if c["attention_bias"]:
                y = y + w[f"{pre}self_attn.{name}.bias"]
            return y

        q = [proj("q_proj", n) for n in normed]
        k = [proj("k_proj", n) for n in normed]
        v = [proj("v_proj", n) for n in normed]
        new = []
        for i in range(length):
            heads = []
            for h in range(nq):
                g = h * nkv // nq  # the kv head this query head reads
                qi = rotate(q[i][h * hd:(h + 1) * hd], i)
                scores = [float(qi @ rotate(k[j][g * hd:(g + 1) * hd], j)) / math.sqrt(hd) for j in range(length)]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                total = sum(e)
                heads.append(sum((e[j] / total) * v[j][g * hd:(g + 1) * hd] for j in range(length)))
            attn = torch.cat(heads)
            h1 = xs[i] + mv(pre + "self_attn.o_proj.weight", attn)
            m = rms(h1, w[pre + "post_attention_layernorm.weight"])
            gate = mv(pre + "mlp.gate_proj.weight", m)
            up = mv(pre + "mlp.up_proj.weight", m)
            new.append(h1 + mv(pre + "mlp.down_proj.weight", gate / (1 + torch.exp(-gate)) * up))
        xs = new
    head = dream.EMBED if c["tie_word_embeddings"] else dream.HEAD
    return torch.stack([mv(head, rms(x, w[dream.NORM])) for x in xs])


def check_forward() -> None:
    worst = 0.0
    for name in MODELS:
        model = dream.Dream.load(os.path.join(GOLDEN, name))
        with open(os.path.join(GOLDEN, f"{name}.json")) as f:
            fixture = json.load(f)
        for case in fixture["forward"]:
            tokens = case["tokens"]
            raw = model.raw_logits(tokens)
            naive = naive_raw_logits(model, tokens)
            scale = float(naive.abs().max())
            diff = float((raw.double() - naive).abs().max()) / scale
            worst = max(worst, diff)
            check(diff < 2e-6, f"{name}: forward differs from the float64 implementation by {diff:.2e} of max|logit|")
            # the shift, by index: prediction i is raw i - 1, prediction 0 is raw 0
            predicted = model(tokens)
            for i in range(len(tokens)):
                src = 0 if i == 0 else i - 1
                check(torch.equal(predicted[i], raw[src]), f"{name}: shifted row {i} is not raw row {src}")
            stored = torch.tensor(case["logits"], dtype=torch.float64)
            last = torch.tensor(case["last_raw"], dtype=torch.float64)
            check(float((stored - predicted.double()).abs().max()) <= 1e-5 * scale, f"{name}: stored logits are stale")
            check(float((last - raw[-1].double()).abs().max()) <= 1e-5 * scale, f"{name}: stored last_raw is stale")
            if model.config["attention_bias"]:
                saved = {n: t.clone() for n, t in model.w.items() if n.endswith(".bias")}
                for n in saved:
                    model.w[n].zero_()
                unbiased = model.raw_logits(tokens)
                for n, t in saved.items():
                    model.w[n].copy_(t)
                check(float((unbiased - raw).abs().max()) > 0.05 * scale, f"{name}: the biases barely matter")
    print(f"forward: 4 models x 3 canvases match float64 within {worst:.2e} of max|logit|; shift and stored rows ok")


# ---------------------------------------------------------------------------------------------------------------
# 2. the shift

def check_shift() -> None:
    raw = torch.arange(5, dtype=torch.float32)[:, None].expand(5, 3)
    out = dream.shift_logits(raw)
    check(out[:, 0].tolist() == [0.0, 0.0, 1.0, 2.0, 3.0], f"shift_logits gives {out[:, 0].tolist()}")
    batched = dream.shift_logits(raw[None].expand(2, 5, 3))
    check(torch.equal(batched[1], out), "shift_logits over a batch")
    print("shift: prediction[0] = raw[0], prediction[i] = raw[i - 1]")


# ---------------------------------------------------------------------------------------------------------------
# 3. sample_tokens and selection against naive loops

def naive_probs(row: list[float], temperature: float, top_p, top_k) -> list[float]:
    z = [v / temperature for v in row] if temperature > 0 else list(row)
    keep = [True] * len(z)
    if top_p is not None and top_p < 1:
        order = sorted(range(len(z)), key=lambda i: (-z[i], i))
        top = max(z)
        e = [math.exp(z[i] - top) for i in order]
        total = sum(e)
        cum = 0.0
        for rank, i in enumerate(order):
            if rank > 0 and cum > top_p:  # the previous prefix already exceeded top_p: drop this one
                keep[i] = False
            cum += e[rank] / total
    if top_k is not None and top_k > 0:
        kept_values = sorted((z[i] if keep[i] else -math.inf for i in range(len(z))), reverse=True)
        kth = kept_values[min(top_k, len(z)) - 1]
        for i in range(len(z)):
            if z[i] < kth:
                keep[i] = False
    top = max(z[i] for i in range(len(z)) if keep[i])
    e = [math.exp(z[i] - top) if keep[i] else 0.0 for i in range(len(z))]
    total = sum(e)
    return [v / total for v in e]


def naive_confidence(alg: str, probs: list[float], x0: int) -> float:
    if alg == "maskgit_plus":
        return probs[x0]
    if alg == "topk_margin":
        s = sorted(probs, reverse=True)
        return s[0] - s[1]
    return sum(p * math.log(p + 1e-10) for p in probs)


def naive_pick(conf: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(conf)), key=lambda j: (-conf[j], j))[:k])


def check_sampling() -> None:
    gen = torch.Generator().manual_seed(7)
    rows = 0
    for trial in range(60):
        n, vocab = 6, 24
        logits = torch.randn(n, vocab, generator=gen) * 3
        if trial % 5 == 0:
            logits[1] = logits[0]          # identical rows: equal confidences, ties go to the lower position
        top_p = [None, 0.8, 0.95, 0.5][trial % 4]
        top_k = [None, None, 3, 7, 1][trial % 5]
        for alg in ("maskgit_plus", "topk_margin", "entropy"):
            params = dg.DreamParams(gen_length=n, steps=1, alg=alg, top_p=top_p, top_k=top_k)
            x0, prob, conf = dg.sample_tokens(logits, params, None)
            for r in range(n):
                probs = naive_probs(logits[r].double().tolist(), 0.0, top_p, top_k)
                best = max(range(vocab), key=lambda i: (probs[i], -i))
                check(int(x0[r]) == best, f"{alg}: x0 {int(x0[r])} != {best}")
                check(abs(float(prob[r]) - probs[best]) < 1e-12, f"{alg}: probability of x0")
                c = naive_confidence(alg, probs, best)
                check(abs(float(conf[r]) - c) < 1e-12, f"{alg}: confidence {float(conf[r])} != {c}")
                rows += 1
            for k in range(1, n + 1):
                order = torch.sort(conf, descending=True, stable=True).indices[:k]
                check(sorted(order.tolist()) == naive_pick(conf.tolist(), k), f"{alg}: top-{k} selection")
        # temperature scales before the filters
        probs = dg.filtered_probs(logits, 0.5, 0.9, 5)
        for r in range(n):
            naive = naive_probs(logits[r].double().tolist(), 0.5, 0.9, 5)
            check(max(abs(a - b) for a, b in zip(probs[r].tolist(), naive)) < 1e-12, "temperature + filters")
    print(f"sampling: x0, probability and confidence of {rows} rows and every top-k selection match naive loops")


# ---------------------------------------------------------------------------------------------------------------
# 4. the schedule

def schedules(lengths: np.ndarray, steps: int, ts: np.ndarray, wide: bool) -> np.ndarray:
    """Count schedules [len(lengths), steps] for canvases of `lengths` masks, all at once: float32 products as
    dream_generate.transfer_count (wide=False) or float64 on the given timesteps (wide=True)."""
    left = lengths.astype(np.int64)
    out = np.zeros((len(lengths), steps), dtype=np.int64)
    for i in range(steps):
        if i == steps - 1:
            k = left.copy()
        elif wide:
            k = np.floor(left.astype(np.float64) * (1.0 - float(ts[i + 1]) / float(ts[i]))).astype(np.int64)
        else:
            ratio = np.float32(np.float32(1.0) - np.float32(ts[i + 1] / ts[i]))
            k = np.floor(left.astype(np.float32) * ratio).astype(np.int64)
        out[:, i] = k
        left = left - k
    return out


def check_schedule() -> None:
    lin_rows = lin_off = 0
    for steps in range(1, 513):
        for eps in (1e-3, 1e-2, 0.05, 1e-5):
            t = dg.timesteps(steps, eps)
            check(t.dtype == np.float32 and len(t) == steps + 1 and t[0] == 1.0, "timesteps shape")
            check(abs(float(t[-1]) - eps) <= 1e-7 * max(1.0, eps), "timesteps end at eps")
            torch_t = torch.linspace(1.0, eps, steps + 1, dtype=torch.float32).numpy()
            check(np.abs(t - torch_t).max() <= 1.2e-7, f"linspace({steps}, {eps}): torch is more than 1 ulp away")
            lin_rows += 1
            lin_off += int(not np.array_equal(t, torch_t))
    # The counts from the canonical float32 rule against three other ways a port might compute them.
    lengths = np.arange(1, 513)
    total, differ = 0, {"torch.linspace f32": 0, "fma linspace f32": 0, "float64 exact": 0}
    for eps in (1e-3, 1e-2, 0.05, 1e-5):
        for steps in range(1, 257):
            ts = dg.timesteps(steps, eps)
            ref = schedules(lengths, steps, ts, False)
            check((ref.sum(axis=1) == lengths).all() and (ref >= 0).all(), "the schedule must fill every mask")
            variants = {
                "torch.linspace f32": schedules(lengths, steps, torch.linspace(1.0, eps, steps + 1).numpy(), False),
                "fma linspace f32": schedules(lengths, steps, dg.linspace_f32(1.0, eps, steps + 1, fma=True), False),
                "float64 exact": schedules(lengths, steps, np.linspace(1.0, eps, steps + 1), True),
            }
            for key, other in variants.items():
                differ[key] += int((other != ref).any(axis=1).sum())
            total += len(lengths)
    for g, s in ((5, 3), (7, 2), (20, 7)):
        check(dg.count_schedule(g, s, 1e-3) == schedules(np.array([g]), s, dg.timesteps(s, 1e-3), False)[0].tolist(),
              "count_schedule against the vectorised rule")
    check(dg.count_schedule(8, 8, 1e-3) == [0, 1, 1, 1, 1, 1, 1, 2], "steps == gen_length schedule")
    check(dg.count_schedule(12, 4, 1e-3) == [2, 3, 3, 4], "few steps schedule")
    check(dg.count_schedule(6, 10, 1e-3) == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2], "steps over length schedule")
    # Every stored case's schedule is the same under all four ways (so no fixture depends on the rounding).
    for name in MODELS:
        with open(os.path.join(GOLDEN, f"{name}.json")) as f:
            for case in json.load(f)["generate"]:
                p = case["params"]
                g, s, eps = p["gen_length"], p["steps"], p["eps"]
                rows = [schedules(np.array([g]), s, dg.timesteps(s, eps), False)[0].tolist(),
                        schedules(np.array([g]), s, torch.linspace(1.0, eps, s + 1).numpy(), False)[0].tolist(),
                        schedules(np.array([g]), s, dg.linspace_f32(1.0, eps, s + 1, fma=True), False)[0].tolist(),
                        schedules(np.array([g]), s, np.linspace(1.0, eps, s + 1), True)[0].tolist()]
                check(all(r == case["counts"] for r in rows), f"{name}/{case['name']}: schedule depends on rounding")
    print(f"schedule: canonical timesteps within 1 ulp of torch.linspace ({lin_off} of {lin_rows} differ in some "
          f"entry); of {total} schedules (gen_length 1..512, steps 1..256, eps 1e-3/1e-2/0.05/1e-5) these differ "
          f"from the canonical float32 counts: {differ}; no stored case does")


# ---------------------------------------------------------------------------------------------------------------
# 5. stored cases against a naive generate loop

def naive_generate(model: dream.Dream, prompt: list[int], params: dict, mask: int):
    canvas = list(prompt) + [mask] * params["gen_length"]
    steps, eps = params["steps"], params["eps"]
    exact = np.linspace(1.0, eps, steps + 1)
    trace, counts = [], []
    for i in range(steps):
        masked = [j for j, t in enumerate(canvas) if t == mask]
        n = len(masked)
        k = n if i == steps - 1 else int(n * (1.0 - exact[i + 1] / exact[i]))
        counts.append(k)
        if k == 0 or n == 0:
            trace.append([])
            continue
        raw = model.raw_logits(canvas).double().tolist()
        cands = []
        for j in masked:
            row = raw[j - 1] if j > 0 else raw[0]  # the prediction for j is the output at j - 1
            probs = naive_probs(row, 0.0, params["top_p"], params["top_k"])
            x0 = max(range(len(probs)), key=lambda v: (probs[v], -v))
            cands.append((j, x0, probs[x0], naive_confidence(params["alg"], probs, x0)))
        picked = naive_pick([c[3] for c in cands], k)
        step = []
        for idx in picked:
            j, x0, p, conf = cands[idx]
            canvas[j] = x0
            step.append((j - len(prompt), x0, p, conf))
        trace.append(step)
    return canvas[len(prompt):], counts, trace


def check_cases() -> None:
    total = 0
    for name in MODELS:
        model = dream.Dream.load(os.path.join(GOLDEN, name))
        with open(os.path.join(GOLDEN, f"{name}.json")) as f:
            fixture = json.load(f)
        mask = fixture["mask_token_id"]
        for case in fixture["generate"]:
            answer, counts, trace = naive_generate(model, case["prompt"], case["params"], mask)
            label = f"{name}/{case['name']}"
            check(answer == case["answer"], f"{label}: naive answer {answer} != stored {case['answer']}")
            check(counts == case["counts"], f"{label}: naive counts {counts} != stored {case['counts']}")
            check(len(trace) == len(case["trace"]), f"{label}: trace length")
            for got, want in zip(trace, case["trace"]):
                check([(p, t) for p, t, _, _ in got] == [(p, t) for p, t, _, _ in want], f"{label}: trace commits")
                for (_, _, p, c), (_, _, sp, sc) in zip(got, want):
                    check(abs(p - sp) <= 1e-5 * max(1.0, abs(sp)) and abs(c - sc) <= 1e-5 * max(1.0, abs(sc)),
                          f"{label}: trace probability/confidence {p}, {c} vs stored {sp}, {sc}")
            p = case["params"]
            params = dg.DreamParams(gen_length=p["gen_length"], steps=p["steps"], alg=p["alg"], top_p=p["top_p"],
                                    top_k=p["top_k"], eps=p["eps"])
            result = dg.generate(model, case["prompt"], params, mask)
            check(result.answer == case["answer"] and result.counts == case["counts"]
                  and result.commits() == [[(q, t) for q, t, _, _ in s] for s in case["trace"]],
                  f"{label}: dream_generate no longer reproduces the stored case")
            eos = fixture["eos_token_id"]
            check(case["first_eos"] == (case["answer"].index(eos) if eos in case["answer"] else -1), f"{label}: first_eos")
            total += 1
    print(f"cases: all {total} stored cases reproduced by a naive float64 loop and by dream_generate")


# ---------------------------------------------------------------------------------------------------------------
# 6. stochastic paths

def check_stochastic() -> None:
    model = dream.Dream.load(os.path.join(GOLDEN, "gqa"))
    mask = model.config["mask_token_id"]
    prompt = [3, 14, 15, 92, 65]
    variants = [dict(alg="origin"), dict(alg="origin", temperature=0.8, top_p=0.9),
                dict(alg="maskgit_plus", temperature=1.0), dict(alg="topk_margin", temperature=0.5, top_k=8),
                dict(alg="entropy", temperature=0.6, top_p=0.95), dict(alg="entropy", alg_temp=0.5),
                dict(alg="maskgit_plus", temperature=0.7, alg_temp=0.1)]
    for v in variants:
        params = dg.DreamParams(gen_length=12, steps=6, **v)
        a = dg.generate(model, prompt, params, mask, seed=11)
        b = dg.generate(model, prompt, params, mask, seed=11)
        check(a.commits() == b.commits() and a.counts == b.counts, f"{v}: not reproducible per seed")
        others = [dg.generate(model, prompt, params, mask, seed=s).commits() for s in (12, 13, 14)]
        check(any(o != a.commits() for o in others), f"{v}: the seed changes nothing")
        check(sum(a.counts) == params.gen_length, f"{v}: counts do not add up to gen_length")
    print(f"stochastic: {len(variants)} stochastic settings reproducible per seed, and seed-dependent")



# ---------------------------------------------------------------------------------------------------------------
# 7. the official loop

def load_upstream(path: str) -> dict:
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("top_p_logits", "top_k_logits", "sample_tokens"):
            keep.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "DreamGenerationMixin":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "_sample":
                    item.decorator_list = []
                    keep.append(item)
    names = sorted(n.name for n in keep)
    check(names == ["_sample", "sample_tokens", "top_k_logits", "top_p_logits"], f"{path}: found {names}")
    namespace = {"torch": torch, "F": torch.nn.functional, "dists": torch.distributions,
                 "DreamGenerationConfig": object, "DreamModelOutput": types.SimpleNamespace}
    namespace.update({k: getattr(typing, k) for k in ("Any", "Dict", "Optional", "Tuple", "Union")})
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace


class UpstreamSelf:
    """What _sample needs of `self`: .device and self(x, attention_mask, tok_idx).logits, the RAW logits [B, L, V]."""

    def __init__(self, model: dream.Dream):
        self.model = model
        self.device = torch.device("cpu")

    def __call__(self, x, attention_mask=None, tok_idx=None):
        check(isinstance(attention_mask, str) and attention_mask == "full" and tok_idx is None, "unpadded batch")
        return types.SimpleNamespace(logits=torch.stack([self.model.raw_logits(row) for row in x]))


def check_upstream(path: str) -> None:
    ns = load_upstream(path)
    total = 0
    for name in MODELS:
        model = dream.Dream.load(os.path.join(GOLDEN, name))
        with open(os.path.join(GOLDEN, f"{name}.json")) as f:
            fixture = json.load(f)
        for case in fixture["generate"]:
            p = case["params"]
            prompt = torch.tensor([case["prompt"]])
            config = types.SimpleNamespace(
                output_history=False, return_dict=False, return_dict_in_generate=False,
                max_length=len(case["prompt"]) + p["gen_length"], mask_token_id=fixture["mask_token_id"],
                steps=p["steps"], eps=p["eps"], alg=p["alg"], alg_temp=p["alg_temp"], temperature=p["temperature"],
                top_p=p["top_p"], top_k=p["top_k"])
            out = ns["_sample"](UpstreamSelf(model), prompt, attention_mask=None, generation_config=config,
                                generation_tokens_hook_func=lambda step, x, logits: x,
                                generation_logits_hook_func=lambda step, x, logits: logits)
            answer = out[0, len(case["prompt"]):].tolist()
            check(answer == case["answer"], f"{name}/{case['name']}: upstream gives {answer}, stored {case['answer']}")
            total += 1
    print(f"upstream: Dream's own _sample / sample_tokens agree on all {total} stored cases")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", help="path to Dream's generation_utils.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_shift()
    check_schedule()
    check_sampling()
    check_forward()
    check_cases()
    check_stochastic()
    if args.upstream:
        check_upstream(args.upstream)
    print("dream_selftest: all checks passed")


if __name__ == "__main__":
    main()
