"""The block-diffusion generate loops, written independently, at temperature 0 (greedy), with a per-step trace:

  * LLaDA2.0 `generate()` (threshold, falling back to the step's quota top-k);
  * LLaDA2.1 editing (`editing_threshold >= 0`, `max_post_steps`; mask-to-token with a top-1 fallback plus
    token-to-token edits of the open block);
  * SDAR `block_diffusion_generate` with `low_confidence_dynamic`, greedy (argmax, confidence = softmax prob).

Shared semantics (README.md, "Generation semantics"):
  * canvas = prompt + masks up to nb * B, nb = ceil((P + G) / B); answer = canvas[P, P + G);
  * blocks b = P // B .. nb - 1; the prompt tail sits in the first open block, recomputed every step, never
    committed or edited;
  * quota[step] = B // steps, + 1 on the first B % steps steps (built from B, not from the block's masks);
  * per step: x0 = argmax of the f32 logits (ties: lowest id), p = softmax(float64(logits))[x0]; conf = p on
    masked positions; commit {conf > threshold} if it has >= quota[step] positions, otherwise the
    min(quota[step], masks) most confident (ties: lower position). threshold <= 0 is "off": the quota's top-k
    only (the official formula would commit every mask at once with threshold 0; the contract pins "off");
  * stop after a completed block when canvas[P, min((b + 1) B, P + G)) holds a stop id.

Deviations from the official loops, all outside what the fixtures exercise or deliberately pinned:
  * SDAR's fallback calls topk(conf, quota) without clamping to the masks left, which would overwrite non-mask
    positions when quota > masks; this loop clamps (as LLaDA2.0 does);
  * LLaDA2.0 first sets steps = min(steps, gen_length // minimal_topk); here steps is taken as given (the
    fixtures keep steps <= gen_length, where the two agree);
  * LLaDA2.1 stops at EOS only with eos_early_stop; here editing uses the same per-block stop rule as the
    others (equivalent to eos_early_stop = True, since a finished block has no masks).

With a template (structured output's JSON skeleton: gen_length entries, -1 where the model writes, else the
token fixed there; vdiff's extension, no official loop has one):
  * its tokens are in the canvas from the start and are never denoised, edited or recorded;
  * a block whose answer positions hold no mask is never denoised (no step, no block_steps entry); in the
    cached form the finished blocks are committed in one forward over the run [first finished, next to
    denoise) just before the next block's first denoise (without a template the run is one block, so the
    forwards are the same as committing each block when it is done);
  * a block holding template tokens spreads its steps over its masks: quota = quota_schedule(masks,
    max(1, min(steps, masks))), masks counted over the whole block (the padding past the answer too);
  * no stop id ends a templated answer: it runs to the last block with an answer mask.

Two forms, which must give the same tokens:
  * "cached": a prefill forward over the full prompt blocks stores their KV; each denoise forward computes only
    the open block, attending the cache; once a block is final one commit forward over it stores its KV (not
    after the last block, nor when the sequence finishes);
  * "recompute": every denoise step forwards [0, (b + 1) B) with the block-causal mask and reads the open
    block's rows.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass
class BlockParams:
    gen_length: int
    block_length: int
    steps: int
    threshold: float = 0.95
    editing_threshold: float = -1.0  # < 0: no editing (LLaDA2.0 / SDAR); >= 0: LLaDA2.1 editing
    max_post_steps: int = 16

    @property
    def editing(self) -> bool:
        return self.editing_threshold >= 0


def quota_schedule(block_length: int, steps: int) -> list[int]:
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass
class Result:
    canvas: list[int]
    answer: list[int]
    trace: list[list[tuple[int, int, float]]] = field(default_factory=list)  # per denoise forward
    block_steps: list[int] = field(default_factory=list)
    forwards: dict = field(default_factory=lambda: {"prefill": 0, "denoise": 0, "commit": 0})
    finished_eos: bool = False           # a stop id in the answer ended the sequence (finish reason eos)
    stopped_early: bool = False          # ... before its last block (the later blocks stay masks)
    edits: int = 0
    threshold_commits: int = 0
    clamped_fallbacks: int = 0           # quota fallbacks whose quota exceeded the masks left (SDAR differs there)
    block_logits: list[torch.Tensor] = field(default_factory=list)  # the open block's logits at each step
    token_margin: float = math.inf       # min top-1 - top-2 logit gap where a flip would change the result
    select_margin: float = math.inf      # min log-confidence gap at a quota top-k boundary
    threshold_margin: float = math.inf   # min |log p - log threshold| over candidates (thresholds > 0)
    router_margin: float = math.inf      # min router selection gap over every forward of the run

    def commits(self) -> list[list[tuple[int, int]]]:
        return [[(pos, tok) for pos, tok, _ in step] for step in self.trace]


def log_gap(a: float, b: float) -> float:
    if a <= 0 or b <= 0:
        return math.inf if a != b else 0.0
    return abs(math.log(a) - math.log(b))


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, V] f32 -> (x0 [L]: argmax, lowest id on ties; p [L] float64: softmax probability of x0)."""
    best = logits.max(dim=-1, keepdim=True).values
    ids = torch.arange(logits.shape[-1]).expand_as(logits)
    x0 = torch.where(logits == best, ids, torch.full_like(ids, logits.shape[-1])).min(dim=-1).values
    prob = torch.softmax(logits.double(), dim=-1).gather(-1, x0[:, None])[:, 0]
    return x0, prob


def top2_gap(row: torch.Tensor) -> float:
    top = row.topk(2).values
    return float(top[0] - top[1])


@torch.no_grad()
def generate(model, prompt: list[int], params: BlockParams, form: str = "cached", logits_hook=None,
             margins: bool = False, template: list[int] | None = None) -> Result:
    """Runs one sequence. model: llada2.LLaDA2 or sdar.SDAR (config mask_token_id, stop_token_ids)."""
    if form not in ("cached", "recompute"):
        raise ValueError(f"unknown form {form}")
    cached = form == "cached"
    c = model.config
    mask_id, stops = c["mask_token_id"], set(c["stop_token_ids"])
    block, gen_length = params.block_length, params.gen_length
    if block < 1 or gen_length < 1 or params.steps < 1:
        raise ValueError("block_length, gen_length and steps must be >= 1")
    p_len = len(prompt)
    if p_len < 1:
        raise ValueError("empty prompt")
    n_blocks = math.ceil((p_len + gen_length) / block)
    x = torch.full((n_blocks * block,), mask_id, dtype=torch.long)
    x[:p_len] = torch.tensor(prompt, dtype=torch.long)
    answer_end = p_len + gen_length
    fixed: set[int] = set()
    if template is not None:
        if len(template) != gen_length or all(t == -1 for t in template):
            raise ValueError("a template has gen_length entries, at least one of them -1 and one not")
        for q, t in enumerate(template):
            if t != -1:
                x[p_len + q] = t
                fixed.add(p_len + q)
    result = Result(canvas=[], answer=[])
    model.router_gap = math.inf

    cache = model.new_cache() if cached else None
    first = p_len // block
    if cached and first > 0:
        model.forward(x[:first * block], 0, cache, store=True, attention_block=block)
        result.forwards["prefill"] += 1
    commit_from = None  # the first finished block not yet committed (cached form)

    def block_logits(start: int, end: int) -> torch.Tensor:
        if cached:
            logits = model.forward(x[start:end], start, cache, store=False, attention_block=block)
        else:
            logits = model.forward(x[:end], 0, None, attention_block=block)[start:]
        result.forwards["denoise"] += 1
        result.block_logits.append(logits)
        if logits_hook is not None:
            logits = logits_hook(logits)
        return logits

    def record(start: int, positions: list[int], x0, prob, kind_edit: bool = False) -> list[tuple[int, int, float]]:
        out = []
        for i in sorted(positions):
            pos = start + i
            x[pos] = int(x0[i])
            if pos < answer_end:
                out.append((pos - p_len, int(x0[i]), float(prob[i])))
                if kind_edit:
                    result.edits += 1
        return out

    def pick(conf: list[float], active: list[int], k: int) -> list[int]:
        """The min(k, len(active)) most confident active positions (ties: lower position)."""
        order = sorted(active, key=lambda i: (-conf[i], i))
        if k > len(order):
            result.clamped_fallbacks += 1
        k = min(k, len(order))
        if margins and k < len(order):
            result.select_margin = min(result.select_margin, log_gap(conf[order[k - 1]], conf[order[k]]))
        return order[:k]

    for b in range(first, n_blocks):
        start, end = b * block, (b + 1) * block
        prompt_in_block = max(0, p_len - start)  # the prompt tail: block offsets [0, prompt_in_block)
        if fixed and not any(int(x[p]) == mask_id for p in range(start, min(end, answer_end))):
            if commit_from is None:
                commit_from = b  # final as laid: committed with the run it belongs to
            continue
        if cached and commit_from is not None:
            model.forward(x[commit_from * block:start], commit_from * block, cache, store=True, attention_block=block)
            result.forwards["commit"] += 1
            commit_from = None
        masks_here = sum(1 for p in range(start, end) if int(x[p]) == mask_id)
        if any(p in fixed for p in range(start, end)):
            quota = quota_schedule(masks_here, max(1, min(params.steps, masks_here)))
        else:
            quota = quota_schedule(block, params.steps)
        steps_here = 0
        post = 0
        step = 0
        while True:
            cur = x[start:end]
            active = [i for i in range(block) if int(cur[i]) == mask_id]
            if params.editing:
                if not active:
                    post += 1
                    if post > params.max_post_steps:
                        break
            else:
                if not active or step >= len(quota):
                    break
            logits = block_logits(start, end)
            steps_here += 1
            x0, prob = greedy(logits)
            conf = [float(prob[i]) if i in active else NEG_INF for i in range(block)]
            thr = params.threshold
            if margins and thr > 0:
                for i in active:
                    result.threshold_margin = min(result.threshold_margin, log_gap(conf[i], thr))
            chosen: list[int] = []
            if active:
                k = 1 if params.editing else quota[step]
                # threshold <= 0 turns the threshold off: the quota's top-k only (SDAR low_confidence_static).
                high = [i for i in active if conf[i] > thr] if thr > 0 else []
                if thr > 0 and len(high) >= k:
                    chosen = high
                    if len(high) > k:
                        result.threshold_commits += 1
                else:
                    chosen = pick(conf, active, k)
            edits: list[int] = []
            if params.editing:
                for i in range(prompt_in_block, block):
                    if i in active or start + i in fixed:
                        continue
                    p = float(prob[i])
                    if margins:
                        if params.editing_threshold > 0 and int(x0[i]) != int(cur[i]):
                            result.threshold_margin = min(result.threshold_margin, log_gap(p, params.editing_threshold))
                        if p > params.editing_threshold:
                            result.token_margin = min(result.token_margin, top2_gap(logits[i]))
                    if p > params.editing_threshold and int(x0[i]) != int(cur[i]):
                        edits.append(i)
            if margins:
                for i in chosen:
                    result.token_margin = min(result.token_margin, top2_gap(logits[i]))
            entries = record(start, chosen, x0, prob) + record(start, edits, x0, prob, kind_edit=True)
            result.trace.append(sorted(entries))
            step += 1
            if params.editing and not active and not edits:
                break
        if bool((x[start:end] == mask_id).any()):
            raise AssertionError(f"block {b} still holds masks after its loop")
        result.block_steps.append(steps_here)
        if not fixed and any(int(t) in stops for t in x[p_len:min(end, answer_end)]):
            result.finished_eos = True
            result.stopped_early = b < n_blocks - 1
            break
        commit_from = b  # committed before the next block's first denoise, if there is one

    result.canvas = x.tolist()
    result.answer = x[p_len:answer_end].tolist()
    result.router_margin = model.router_gap
    return result


def generate_checked(model, prompt: list[int], params: BlockParams, margins: bool = False,
                     template: list[int] | None = None) -> tuple[Result, float]:
    """Runs both forms, asserts they give the same tokens, commits and step boundaries and nearly the same
    probabilities; returns the cached form's result and the largest |logit| difference between the forms."""
    cached = generate(model, prompt, params, "cached", margins=margins, template=template)
    full = generate(model, prompt, params, "recompute", template=template)
    if cached.canvas != full.canvas or cached.commits() != full.commits() or cached.block_steps != full.block_steps:
        raise AssertionError(f"cached and recomputed forms disagree on prompt {prompt} ({params})")
    diff = 0.0
    for a, b in zip(cached.block_logits, full.block_logits):
        diff = max(diff, float((a - b).abs().max()))
    for sa, sb in zip(cached.trace, full.trace):
        for (_, _, pa), (_, _, pb) in zip(sa, sb):
            if abs(pa - pb) > 1e-5:
                raise AssertionError(f"probabilities differ between forms: {pa} vs {pb}")
    return cached, diff


def load_model(model_dir: str):
    """llada2.LLaDA2 or sdar.SDAR by config.json model_type."""
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "llada2_moe":
        import llada2
        return llada2.LLaDA2.load(model_dir)
    if model_type in ("sdar", "sdar_moe"):
        import sdar
        return sdar.SDAR.load(model_dir)
    raise ValueError(f"unknown model_type {model_type}")
