"""Checks the block-diffusion reference against things it must agree with. Exits non-zero on the first failure.

    /usr/bin/python3 tools/reference/block_selftest.py

1. The forward of every golden-block model against a second implementation in float64, written another way:
   one position and one head at a time, RoPE as rotations of (x[i], x[i + rotary_dim / 2]) pairs over the
   rotary dims only, GQA by index arithmetic, the block-causal rule as an explicit list of visible keys, the
   routers as per-token loops over Python lists (group scores from a sorted copy, experts from a sorted copy)
   and the MoE output summed expert by expert for that token; the input of every product with a bf16-stored
   weight rounded to bf16 (selftest.naive_round_bf16), the router's never.
2. The routers alone against that per-token loop on many random rows: the same experts, the same weights.
1b/2b. The same two checks on a bf16-stored copy of every golden-block model (the fixtures are f32), so the bf16
   input rounding of QKV / dense / MLP / experts / shared expert / head is exercised, and the router's exemption
   (an f32 router: rounding its input would move the router weights by ~1e-3 and fail the 1e-5 check); the copy's
   logits must differ from the same weights run without the rounding. (A float64 activation may land on the other
   side of a bf16 midpoint than the f32 one; the rows after such a flip may differ by up to 1e-2 of max|logit|,
   at most one row in 20.)
3. The KV cache: a canvas forwarded block by block through the cache (prefill of several blocks, then one block
   at a time, stored) gives the logits of the block-causal forward over the whole canvas; a block attending the
   cache without storing leaves the cache unchanged.
4. Every stored generate case: the cached and full-recompute forms agree (tokens, commits, step boundaries), and
   both reproduce the stored answer and trace; the stored forward logits are current.
5. With --upstream-llada2 PATH (a modeling_llada2_moe.py holding LLaDA2.0's generate() with the greedy branch) and
   --upstream-sdar PATH (JetAstra/SDAR generate.py): the official loops, read from the given files at run time
   (never copied here), run with this reference's models as their model, on every stored case they can express,
   give the same answers and the same number of denoising forwards. LLaDA2.0's generate() is taken out of its
   class by name with `ast` (the rest of the file needs transformers); SDAR's module gets a stand-in for the
   `transformers` imports and a greedy sampler (argmax, softmax probability) in place of its multinomial one,
   since it has no temperature-0 branch. threshold 0 ("off") is passed as 1.0 (nothing exceeds it).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import textwrap
import types
import typing

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import block_generate as bg  # noqa: E402
import llada2  # noqa: E402
import safetensors_io  # noqa: E402
import sdar  # noqa: E402
from selftest import naive_round_bf16  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(HERE, "..", "..", "test", "fixtures", "golden-block"))


def check(condition: bool, message: str) -> None:
    if not condition:
        print("FAIL:", message)
        sys.exit(1)


def naive_route(model, layer: int, row: list[float]) -> tuple[list[int], list[float]]:
    """One token's router, float64, Python lists."""
    c = model.config
    b = model.layer_name(layer, "mlp.gate.")
    weight = model.w[b + "weight"].double().tolist()
    logits = [sum(a * w for a, w in zip(row, wrow)) for wrow in weight]
    k = c["num_experts_per_tok"]
    if isinstance(model, llada2.LLaDA2):
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
        bias = [0.0] * len(scores)
        if c["moe_router_enable_expert_bias"]:
            bias = model.w[b + "expert_bias"].double().tolist()
        biased = [s + e for s, e in zip(scores, bias)]
        size = c["num_experts"] // c["n_group"]
        group_score = []
        for g in range(c["n_group"]):
            members = sorted(biased[g * size:(g + 1) * size], reverse=True)
            group_score.append(members[0] + members[1])
        groups = sorted(range(c["n_group"]), key=lambda g: -group_score[g])[:c["topk_group"]]
        candidates = [e for e in range(c["num_experts"]) if e // size in groups]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:k]
        w = [scores[e] for e in chosen]
        if k > 1:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        return chosen, [v * c["routed_scaling_factor"] for v in w]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [v / sum(exps) for v in exps]
    chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
    w = [probs[e] for e in chosen]
    if c["norm_topk_prob"]:
        w = [v / sum(w) for v in w]
    return chosen, w


def naive_mv(model, name: str, x: torch.Tensor, w: dict) -> torch.Tensor:
    """w[name] @ x (float64), x rounded to bf16 first when that weight was stored as bf16."""
    if name in model.bf16:
        x = torch.from_numpy(naive_round_bf16(x.numpy()))
    return w[name] @ x


def naive_swiglu(model, x: torch.Tensor, prefix: str, w: dict) -> torch.Tensor:
    gate = naive_mv(model, prefix + "gate_proj.weight", x, w)
    up = naive_mv(model, prefix + "up_proj.weight", x, w)
    return naive_mv(model, prefix + "down_proj.weight", gate / (1 + torch.exp(-gate)) * up, w)


def naive_mlp(model, layer: int, x: torch.Tensor, w: dict) -> torch.Tensor:
    """x [D] float64 -> the layer's MLP output for one token."""
    b = model.layer_name(layer, "mlp.")
    if not model.is_moe(model.config, layer):
        return naive_swiglu(model, x, b, w)
    chosen, weights = naive_route(model, layer, x.tolist())
    out = torch.zeros_like(x)
    for e, v in zip(chosen, weights):
        out += v * naive_swiglu(model, x, f"{b}experts.{e}.", w)
    if isinstance(model, llada2.LLaDA2) and model.config["num_shared_experts"]:
        out += naive_swiglu(model, x, b + "shared_experts.", w)
    return out


def naive_forward(model, tokens: list[int], attention_block: int) -> torch.Tensor:
    c = model.config
    w = {k: v.double() for k, v in model.w.items()}
    nq, nkv, hd, rot = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rotary_dim"]
    eps = c["rms_norm_eps"]
    length = len(tokens)

    def norm(v, weight):
        return v / torch.sqrt((v * v).mean() + eps) * weight

    def rope(vec, pos):
        out = vec.clone()
        half = rot // 2
        for i in range(half):
            angle = pos * c["rope_theta"] ** (-2.0 * i / rot)
            a, b = float(vec[i]), float(vec[i + half])
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    def visible(i):
        if attention_block <= 0:
            return list(range(length))
        return [j for j in range(length) if j // attention_block <= i // attention_block]

    x = [w[model.EMBED][t].clone() for t in tokens]
    for layer in range(c["num_hidden_layers"]):
        n = [norm(v, w[model.layer_name(layer, "input_layernorm.weight")]) for v in x]
        q, k, v = [], [], []
        for vec in n:
            if isinstance(model, llada2.LLaDA2):
                qkv = naive_mv(model, model.layer_name(layer, "attention.query_key_value.weight"), vec, w)
                q.append(qkv[:nq * hd].view(nq, hd))
                k.append(qkv[nq * hd:(nq + nkv) * hd].view(nkv, hd))
                v.append(qkv[(nq + nkv) * hd:].view(nkv, hd))
            else:
                p = model.layer_name(layer, "self_attn.")
                q.append(naive_mv(model, p + "q_proj.weight", vec, w).view(nq, hd))
                k.append(naive_mv(model, p + "k_proj.weight", vec, w).view(nkv, hd))
                v.append(naive_mv(model, p + "v_proj.weight", vec, w).view(nkv, hd))
        qn, kn = model.qk_norm_names(layer)
        for i in range(length):
            q[i] = torch.stack([rope(norm(h, w[qn]) if qn else h, i) for h in q[i]])
            k[i] = torch.stack([rope(norm(h, w[kn]) if kn else h, i) for h in k[i]])
        new_x = []
        for i in range(length):
            heads = []
            keys = visible(i)
            for h in range(nq):
                g = h // (nq // nkv)
                scores = torch.tensor([float(q[i][h] @ k[j][g]) / math.sqrt(hd) for j in keys], dtype=torch.float64)
                p = torch.softmax(scores, dim=0)
                heads.append(sum(pj * v[j][g] for pj, j in zip(p, keys)))
            h_out = x[i] + naive_mv(model, model.attn_out_name(layer), torch.cat(heads), w)
            m = norm(h_out, w[model.layer_name(layer, "post_attention_layernorm.weight")])
            new_x.append(h_out + naive_mlp(model, layer, m, w))
        x = new_x
    return torch.stack([naive_mv(model, model.head_name, norm(v, w[model.NORM]), w) for v in x])


def models():
    for name in sorted(os.listdir(GOLDEN)):
        model_dir = os.path.join(GOLDEN, name)
        if os.path.isdir(model_dir):
            with open(model_dir + ".json") as f:
                yield name, bg.load_model(model_dir), json.load(f)


def bf16_models(tmp: str):
    """Each golden-block model written again with its weights stored as bf16 (expert_bias stays f32), loaded."""
    for name, _, fixture in models():
        with open(os.path.join(GOLDEN, name, "config.json")) as f:
            raw = json.load(f)
        model_dir = os.path.join(tmp, name)
        llada2.write_model_dir(model_dir, raw, safetensors_io.load_dir(os.path.join(GOLDEN, name)), dtype=torch.bfloat16)
        yield f"{name} (bf16 copy)", bg.load_model(model_dir), fixture


def test_forward(variants=None) -> None:
    """variants (bf16 copies): the bf16 input rounding is discontinuous, so a float64 activation on the other side of
    a bf16 midpoint than the f32 one (f32 noise, ~1e-5 of a bf16 ulp) moves that row by up to ~3e-3 of max|logit|
    from there on. Such rows are allowed there, one in 20 at most and each within 1e-2; the others within 1e-5."""
    worst = 0.0
    bf16 = variants is not None
    flipped = rows = 0
    for name, model, fixture in variants if bf16 else models():
        if bf16:
            check(len(model.bf16) > 0, f"{name}: no weight recorded as stored bf16")
            plain = type(model)(model.config, model.w)  # the same (bf16-valued) weights, stored f32: no rounding
        for case in fixture["forward"]:
            ours = model.forward(case["tokens"], attention_block=case["attention_block"]).double()
            ref = naive_forward(model, case["tokens"], case["attention_block"])
            row_err = (ours - ref).abs().max(dim=1).values / ref.abs().max()
            if bf16:
                far = row_err > 1e-5
                flipped, rows = flipped + int(far.sum()), rows + row_err.numel()
                check(float(row_err.max()) < 1e-2, f"{name}: a row differs from the float64 check by {float(row_err.max()):.2e}")
                row_err = row_err[~far]
                unrounded = plain.forward(case["tokens"], attention_block=case["attention_block"]).double()
                check(float((unrounded - ours).abs().max()) > 1e-3 * float(ours.abs().max()),
                      f"{name}: the bf16 input rounding changes nothing")
            err = float(row_err.max()) if row_err.numel() else 0.0
            worst = max(worst, err)
            check(err < 1e-5, f"{name}: forward differs from the float64 check by {err:.2e} (relative to max)")
            if bf16:
                continue
            stored = torch.tensor(case["logits"], dtype=torch.float64)
            check(float((stored - ours).abs().max()) <= 1e-5 * float(ours.abs().max()) + 1e-6,
                  f"{name}: stored forward logits are stale")
    if bf16:
        check(flipped * 20 <= rows, f"bf16 copies: {flipped} of {rows} rows differ from the float64 check by > 1e-5")
        print(f"ok forward (bf16 copies, rounded inputs) against float64 per-token loops: worst relative difference "
              f"{worst:.1e} in {rows - flipped} of {rows} rows; {flipped} rows past a rounding flip (each < 1e-2)")
        return
    print(f"ok forward (fixtures) against float64 per-token loops (worst relative difference {worst:.1e})")


def test_router(variants=None) -> None:
    for name, model, _ in variants if variants is not None else models():
        c = model.config
        layers = [i for i in range(c["num_hidden_layers"]) if model.is_moe(c, i)]
        if not layers:
            continue
        gen = torch.Generator().manual_seed(5)
        rows = torch.randn(256, c["hidden_size"], generator=gen)
        worst = 0.0
        for layer in layers:
            idx, weight = model.route(layer, rows)
            for t in range(rows.shape[0]):
                chosen, ref_w = naive_route(model, layer, rows[t].double().tolist())
                got = dict(zip(idx[t].tolist(), weight[t].tolist()))
                check(sorted(got) == sorted(chosen), f"{name} layer {layer} row {t}: experts {sorted(got)} != {chosen}")
                for e, v in zip(chosen, ref_w):
                    worst = max(worst, abs(got[e] - v))
            y = model.mlp(layer, rows).double()
            w64 = {k: v.double() for k, v in model.w.items()}
            ref = torch.stack([naive_mlp(model, layer, rows[t].double(), w64) for t in range(rows.shape[0])])
            err = float((y - ref).abs().max() / ref.abs().max())
            check(err < 1e-5, f"{name} layer {layer}: MoE output differs from the per-token loop by {err:.2e}")
        check(worst < 1e-5, f"{name}: router weights differ by {worst:.2e}")
        print(f"ok router {name} (256 rows x {len(layers)} layers; worst weight difference {worst:.1e})")


def test_cache() -> None:
    for name, model, fixture in models():
        block = fixture["block_size"]
        gen = torch.Generator().manual_seed(9)
        tokens = torch.randint(0, fixture["mask_token_id"], (5 * block,), generator=gen).tolist()
        full = model.forward(tokens, attention_block=block)
        cache = model.new_cache()
        parts = [model.forward(tokens[:2 * block], 0, cache, store=True, attention_block=block)]
        for b in range(2, 5):
            s, e = b * block, (b + 1) * block
            before = cache.length
            peek = model.forward(tokens[s:e], s, cache, store=False, attention_block=block)
            check(cache.length == before, "a forward without store changed the cache")
            parts.append(model.forward(tokens[s:e], s, cache, store=True, attention_block=block))
            check(float((peek - parts[-1]).abs().max()) == 0.0, "peek and store forwards differ")
        diff = float((torch.cat(parts) - full).abs().max())
        check(diff < 1e-4 * float(full.abs().max()), f"{name}: block-by-block forwards differ from one forward: {diff}")
        print(f"ok cache {name} (block-by-block vs whole canvas: max |dlogit| {diff:.1e})")


def test_generate() -> None:
    worst = 0.0
    count = 0
    for name, model, fixture in models():
        for case in fixture["generate"]:
            params = bg.BlockParams(**case["params"])
            result, diff = bg.generate_checked(model, case["prompt"], params)
            worst = max(worst, diff)
            where = f"{name}/{case['name']}"
            check(result.answer == case["answer"], f"{where}: answer {result.answer} != stored {case['answer']}")
            stored = [[(p, t) for p, t, _ in step] for step in case["trace"]]
            check(result.commits() == stored, f"{where}: commits differ from the stored trace")
            probs = [p for step in result.trace for _, _, p in step]
            stored_probs = [p for step in case["trace"] for _, _, p in step]
            check(all(abs(a - b) < 1e-5 for a, b in zip(probs, stored_probs)), f"{where}: trace probabilities")
            check(result.forwards == case["forwards"] and result.block_steps == case["block_steps"],
                  f"{where}: forward counts {result.forwards} / block steps {result.block_steps}")
            check(result.finished_eos == case["finished_eos"] and result.stopped_early == case["stopped_early"],
                  f"{where}: stop")
            opened = len(result.block_steps)
            last_opened = len(case["prompt"]) // params.block_length + opened - 1
            n_blocks = math.ceil((len(case["prompt"]) + params.gen_length) / params.block_length)
            commits = opened - (1 if (result.finished_eos or last_opened == n_blocks - 1) else 0)
            check(result.forwards["commit"] == commits, f"{where}: one commit forward per finished block")
            check(result.forwards["prefill"] == int(len(case["prompt"]) >= params.block_length), f"{where}: prefill")
            check(result.forwards["denoise"] == sum(result.block_steps) == len(result.trace), f"{where}: denoise")
            count += 1
    print(f"ok generate: {count} stored cases, cached = recompute (max |dlogit| {worst:.1e})")


def load_llada2_upstream(path: str) -> type:
    """A class whose generate() and helpers are LLaDA2.0's, taken from the file by name; forward() is ours."""
    source = open(path).read()
    wanted = {"generate", "_sample_with_temperature_topk_topp", "_get_num_transfer_tokens", "_top_k_logits",
              "_top_p_logits"}
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "generate"
                                                  for f in node.body):
            break
    else:
        raise ValueError(f"{path}: no class with a generate() method")
    namespace = {"torch": torch, "F": torch.nn.functional, "Optional": typing.Optional}
    methods = {}
    for f in node.body:
        if isinstance(f, ast.FunctionDef) and f.name in wanted:
            exec(textwrap.dedent("\n".join(lines[f.lineno - 1:f.end_lineno])), namespace)
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in f.decorator_list)
            methods[f.name] = staticmethod(namespace[f.name]) if static else namespace[f.name]
    check(set(methods) == wanted, f"{path}: missing {wanted - set(methods)}")

    class Upstream:
        def __init__(self, model, block):
            self.model, self.block, self.forwards = model, block, 0
            self.device = torch.device("cpu")

        def forward(self, x, attention_mask=None, position_ids=None):
            length = x.shape[1]
            expected = llada2.block_causal_bias(0, length, self.block)
            check(torch.equal(attention_mask[0, 0].float(), expected), "upstream mask is not block-causal")
            check(torch.equal(position_ids[0], torch.arange(length)), "upstream positions")
            self.forwards += 1
            return types.SimpleNamespace(logits=self.model.forward(x[0], attention_block=self.block)[None])

    for name, fn in methods.items():
        setattr(Upstream, name, fn)
    return Upstream


def load_sdar_upstream(path: str) -> types.ModuleType:
    source = open(path).read()

    class DynamicCache:
        pass
    stub = types.ModuleType("transformers")
    stub.AutoModelForCausalLM = stub.AutoTokenizer = stub.GenerationConfig = None
    cache_utils = types.ModuleType("transformers.cache_utils")
    cache_utils.DynamicCache = DynamicCache
    saved = {k: sys.modules.get(k) for k in ("transformers", "transformers.cache_utils")}
    sys.modules.update({"transformers": stub, "transformers.cache_utils": cache_utils})
    try:
        module = types.ModuleType("upstream_sdar_generate")
        exec(compile(source, path, "exec"), module.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v

    def greedy(logits, temperature=1.0, top_k=0, top_p=1.0):
        x0, p = bg.greedy(logits.reshape(-1, logits.shape[-1]))
        return x0.view(logits.shape[:-1]), p.view(logits.shape[:-1])
    module.sample_with_temperature_topk_topp = greedy
    return module


class SDARUpstreamModel:
    """What SDAR's block_diffusion_generate expects of a model, on this reference's forward and KV cache."""

    def __init__(self, model, block):
        self.model, self.block = model, block
        self.device = torch.device("cpu")
        self.forwards = {"store": 0, "denoise": 0}

    def eval(self):
        return self

    def __call__(self, x, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                 store_kv=False):
        if not hasattr(past_key_values, "reference_cache"):
            past_key_values.reference_cache = self.model.new_cache()
        start, length = int(position_ids[0, 0]), x.shape[1]
        check(torch.equal(position_ids[0], torch.arange(start, start + length)), "upstream positions")
        visible = llada2.block_causal_bias(start, length, self.block) == 0
        check(torch.equal(attention_mask[0].bool(), visible), "upstream mask is not block-causal")
        self.forwards["store" if store_kv else "denoise"] += 1
        logits = self.model.forward(x[0], start, past_key_values.reference_cache, store=bool(store_kv),
                                    attention_block=self.block)
        return types.SimpleNamespace(logits=logits[None])


def test_upstream(llada2_path: str | None, sdar_path: str | None) -> None:
    upstream_llada2 = load_llada2_upstream(llada2_path) if llada2_path else None
    upstream_sdar = load_sdar_upstream(sdar_path) if sdar_path else None
    compared, differing = 0, []
    for name, model, fixture in models():
        mask, stops = fixture["mask_token_id"], fixture["eos_token_ids"]
        for case in fixture["generate"]:
            p = case["params"]
            params = bg.BlockParams(**p)
            prompt, plen, glen = case["prompt"], len(case["prompt"]), p["gen_length"]
            ours = bg.generate(model, prompt, params, "cached")
            threshold = p["threshold"] if p["threshold"] > 0 else 1.0
            where = f"{name}/{case['name']}"
            if fixture["model_type"] == "llada2_moe":
                if upstream_llada2 is None or params.editing or p["steps"] > glen:
                    continue
                check(len(stops) == 1, "LLaDA2.0 generate() takes one eos id")
                up = upstream_llada2(model, p["block_length"])
                out = up.generate(inputs=torch.tensor([prompt]), temperature=0.0, block_length=p["block_length"],
                                  steps=p["steps"], gen_length=glen, threshold=threshold, eos_id=stops[0],
                                  mask_id=mask)[0, plen:].tolist()
                expected = case["answer"][:case["answer"].index(stops[0]) + 1] if stops[0] in case["answer"] \
                    else case["answer"]
                check(out == expected, f"{where}: upstream {out} != fixture {expected}")
                check(up.forwards == case["forwards"]["denoise"], f"{where}: upstream ran {up.forwards} forwards")
            else:
                if upstream_sdar is None:
                    continue
                wrapper = SDARUpstreamModel(model, p["block_length"])
                out = upstream_sdar.block_diffusion_generate(
                    wrapper, {"input_ids": torch.tensor([prompt])}, mask, gen_length=glen,
                    block_length=p["block_length"], denoising_steps=p["steps"], temperature=0.0,
                    remasking_strategy="low_confidence_dynamic", confidence_threshold=threshold,
                    stopping_criteria_idx=stops)[0, plen:plen + glen].tolist()
                if ours.clamped_fallbacks:
                    # SDAR's fallback topk(conf, quota) is not clamped to the masks left: it rewrites other positions.
                    differing.append(f"{where} ({'differs' if out != case['answer'] else 'agrees'})")
                    continue
                check(out == case["answer"], f"{where}: upstream {out} != fixture {case['answer']}")
                check(wrapper.forwards["denoise"] == case["forwards"]["denoise"], f"{where}: upstream forwards")
            compared += 1
    note = f"; not compared (quota > masks left in a fallback step): {differing}" if differing else ""
    print(f"ok upstream generate loops agree on {compared} stored cases{note}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream-llada2", help="path to a modeling_llada2_moe.py with LLaDA2.0's generate()")
    parser.add_argument("--upstream-sdar", help="path to JetAstra/SDAR generate.py")
    args = parser.parse_args()
    torch.set_num_threads(2)
    check(bg.quota_schedule(8, 3) == [3, 3, 2] and bg.quota_schedule(4, 4) == [1, 1, 1, 1], "quota schedule")
    test_router()
    test_cache()
    test_forward()
    with tempfile.TemporaryDirectory() as tmp:
        copies = list(bf16_models(tmp))
        test_forward(copies)
        test_router(copies)
    test_generate()
    if args.upstream_llada2 or args.upstream_sdar:
        test_upstream(args.upstream_llada2, args.upstream_sdar)


if __name__ == "__main__":
    main()
