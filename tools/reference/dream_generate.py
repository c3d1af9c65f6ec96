"""Dream's generation loop (`diffusion_generate` -> `_sample` with `sample_tokens`), written independently from the
semantics of the public Dream code (`generation_utils.py` of Dream-org/Dream-v0-*-7B), one sequence at a time,
with a per-step trace.

Canvas and steps
  * canvas = prompt + gen_length mask tokens (upstream: max_length = prompt + max_new_tokens, padded with the mask
    id); the whole canvas is denoised for exactly `steps` steps; there are no blocks and no early stop: an EOS is an
    ordinary token (the caller cuts the text at the first one);
  * each step: one forward over the whole canvas (bidirectional), predictions SHIFTED (dream.shift_logits: the
    prediction for position i is the output at i - 1); only the masked positions are sampled.

Time schedule and tokens per step
  * timesteps = linspace(1, eps, steps + 1) in float32 (upstream: torch.linspace; here its scalar rule written out,
    see timesteps()); eps default 1e-3; step i has t = ts[i], s = ts[i+1];
  * maskgit_plus / topk_margin / entropy commit k = int(n * (1 - s / t)) at steps i < steps - 1 and k = n at the
    last step, with n = the number of masks left in the row. Upstream evaluates this on 0-dim float32 tensors:
    n as float32 (mask count / batch size), s / t, 1 - (s / t) and the product each rounded to float32, then int()
    truncates. `transfer_count` does exactly that with numpy float32 scalars. Consequences worth knowing: with
    steps == gen_length the first step commits int(1 - eps) = 0 tokens and the last step commits 2; steps beyond
    what the masks need commit 0 (the forward changes nothing);
  * origin: each masked position is revealed independently with probability p = 1 - s / t (float32; 1 at the
    last step), its token sampled as below; the number per step is random.

sample_tokens(logits of the masked positions, temperature, top_p, top_k)
  * temperature > 0: logits / temperature; top_p (when set and < 1): sort descending, cumulative softmax, drop the
    entries whose cumulative probability is > top_p, except the first of the sorted order (the mask is shifted
    right by one); top_k (when set): drop logits < the k-th largest (ties at the k-th are kept). Dropped entries
    become -inf here (upstream: finfo.min, the same zero probability). probs = softmax of what is left;
  * temperature > 0: x0 ~ Categorical(probs), confidence = probs[x0]; temperature 0: x0 = argmax (lowest id on
    ties), confidence = max prob. NOTE: at temperature 0 top_p / top_k do not change x0 but DO change the
    confidences (the softmax is renormalised over the kept tokens);
  * maskgit_plus: confidence = probs[x0]; topk_margin: top-1 prob - top-2 prob (of the filtered probs, whatever x0
    is); entropy: sum(p * log(p + 1e-10)) (negative entropy, higher = more certain).
Selection
  * alg_temp None or 0: the k masked positions with the highest confidence (ties: lower position; upstream's
    torch.topk leaves ties unspecified); alg_temp > 0: k positions drawn without replacement from
    softmax(confidence / alg_temp) over the masked positions (torch.multinomial).
  * a committed token equal to the mask id leaves the position masked (upstream does the same); fixtures avoid it.

Precision: the forward is float32; every softmax / filter / confidence here is float64 computed from the float32
logits (upstream uses the logits' dtype, bf16 on the real model). Only the count schedule is float32, on purpose.

Randomness: temperature > 0, alg_temp > 0 and origin draw from ONE torch.Generator (CPU mt19937) seeded with
`seed`, in this order per step: origin: torch.rand(masks) for the reveal test, then torch.multinomial(probs, 1)
over the revealed positions in position order (temperature > 0); the others: torch.multinomial(probs, 1) over all
masked positions in position order (temperature > 0), then torch.multinomial(weights, k) (alg_temp > 0). The
native engine has its own counter-based RNG, so stochastic paths are checked for reproducibility per seed only,
never for equality with this file. Deterministic (and cross-checked): maskgit_plus, topk_margin, entropy at
temperature 0 with alg_temp 0/None, with or without top_p / top_k.

Trace: per step, [(answer position, token, probability, confidence)] in ascending position, where probability is
the filtered softmax probability of the committed token and confidence the algorithm's score (equal to the
probability for maskgit_plus and origin). A step may be empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

NEG_INF = float("-inf")
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
ENTROPY_EPS = 1e-10


@dataclass
class DreamParams:
    gen_length: int
    steps: int
    alg: str = "origin"          # DreamGenerationConfig's default
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3

    @property
    def deterministic(self) -> bool:
        return self.alg != "origin" and self.temperature == 0 and not self.alg_temp


def timesteps(steps: int, eps: float) -> np.ndarray:
    """linspace(1, eps, steps + 1) in float32 by the scalar rule of linspace_f32 (no fused multiply-add): the
    canonical timesteps of this reference and of the engine. torch.linspace agrees within 1 ulp (its CPU
    vectorised path and its CUDA kernel round some entries differently), which can move a count only where
    n (1 - s/t) is an exact integer in real arithmetic (dream_selftest counts how often)."""
    return linspace_f32(1.0, eps, steps + 1)


def linspace_f32(start: float, end: float, count: int, fma: bool = False) -> np.ndarray:
    """torch's scalar linspace rule written out in float32: step = (end - start) / (count - 1); index i below
    count // 2 gives start + step * i, the others end - step * (count - 1 - i). fma=True rounds step * i + start
    once (what a compiler that contracts to a fused multiply-add produces)."""
    f = np.float32
    start, end = f(start), f(end)
    if count == 1:
        return np.array([start], dtype=np.float32)
    step = f(f(end - start) / f(count - 1))
    half = count // 2
    out = np.empty(count, dtype=np.float32)
    for i in range(count):
        if i < half:
            out[i] = f(float(step) * i + float(start)) if fma else f(f(step * f(i)) + start)
        else:
            j = count - 1 - i
            out[i] = f(float(end) - float(step) * j) if fma else f(end - f(step * f(j)))
    return out


def transfer_count(masks: int, i: int, steps: int, ts: np.ndarray) -> int:
    """Tokens committed at step i with `masks` masks left (maskgit_plus / topk_margin / entropy), in float32."""
    if i >= steps - 1:
        return int(masks)
    f = np.float32
    ratio = f(f(1.0) - f(ts[i + 1] / ts[i]))
    return int(f(f(masks) * ratio))


def transfer_fraction_f64(masks: int, i: int, ts: np.ndarray) -> float:
    """The same product in float64 from the same float32 timesteps (to see how close a count is to flipping)."""
    return masks * (1.0 - float(ts[i + 1]) / float(ts[i]))


def count_schedule(gen_length: int, steps: int, eps: float) -> list[int]:
    """Commits per step for a canvas with gen_length masks, when every commit fills a mask (the usual case)."""
    ts = timesteps(steps, eps)
    left, out = gen_length, []
    for i in range(steps):
        k = transfer_count(left, i, steps, ts)
        out.append(k)
        left -= k
    return out


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """logits [n, V] (any float dtype) -> float64 probabilities after temperature, top_p and top_k."""
    z = logits.double()
    if temperature > 0:
        z = z / temperature
    if top_p is not None and top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
        drop_sorted = cum > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, NEG_INF)
    if top_k is not None and top_k > 0:
        k = min(top_k, z.shape[-1])
        kth = z.topk(k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, NEG_INF)
    return torch.softmax(z, dim=-1)


def top_p_gap(logits: torch.Tensor, temperature: float, top_p: float) -> float:
    """min over rows and sorted prefixes of |cumulative probability - top_p|: how far the top_p cut is from moving."""
    z = logits.double()
    if temperature > 0:
        z = z / temperature
    cum = torch.softmax(torch.sort(z, dim=-1, descending=True).values, dim=-1).cumsum(dim=-1)
    return float((cum - top_p).abs().min())


def argmax_low(probs: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, lowest index on ties."""
    best = probs.max(dim=-1, keepdim=True).values
    ids = torch.arange(probs.shape[-1]).expand_as(probs)
    return torch.where(probs == best, ids, torch.full_like(ids, probs.shape[-1])).min(dim=-1).values


def confidence_of(alg: str, probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    if alg in ("maskgit_plus", "origin"):
        return probs.gather(-1, x0[:, None])[:, 0]
    if alg == "topk_margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs + ENTROPY_EPS)).sum(dim=-1)
    raise ValueError(f"unknown alg {alg}")


def sample_tokens(logits: torch.Tensor, params: DreamParams, generator: torch.Generator | None):
    """logits [n, V] of masked positions -> (x0 [n], probability of x0 [n] f64, confidence [n] f64)."""
    probs = filtered_probs(logits, params.temperature, params.top_p, params.top_k)
    if params.temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator)[:, 0] if probs.shape[0] else torch.zeros(0, dtype=torch.long)
    else:
        x0 = argmax_low(probs)
    p = probs.gather(-1, x0[:, None])[:, 0]
    return x0, p, confidence_of(params.alg, probs, x0)


def selection_gap(alg: str, higher: float, lower: float) -> float:
    """How far apart the last chosen and the first left-out confidence are: a log ratio for maskgit_plus
    (probabilities), a plain difference for topk_margin and entropy."""
    if higher == lower:
        return 0.0
    if alg == "maskgit_plus":
        if lower <= 0:
            return math.inf
        return math.log(higher) - math.log(lower)
    return higher - lower


@dataclass
class Result:
    canvas: list[int]
    answer: list[int]
    trace: list[list[tuple[int, int, float, float]]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)   # commits per step (what the schedule asked for)
    token_margin: float = math.inf                   # min top-1 - top-2 logit gap at committed positions (temp 0)
    select_margin: float = math.inf                  # min selection gap at the top-k boundary
    top_p_margin: float = math.inf                   # min |cumulative prob - top_p| over masked rows of every step
    count_margin: float = math.inf                   # min distance of n (1 - s/t) (float64) from an integer

    def commits(self) -> list[list[tuple[int, int]]]:
        return [[(pos, tok) for pos, tok, _, _ in step] for step in self.trace]

    def first_eos(self, eos_ids) -> int:
        for i, tok in enumerate(self.answer):
            if tok in eos_ids:
                return i
        return -1


@torch.no_grad()
def generate(model, prompt: list[int], params: DreamParams, mask_id: int, seed: int = 0, logits_hook=None,
             margins: bool = False, template: list[int] | None = None) -> Result:
    """One sequence. model(tokens [L]) -> SHIFTED predictions [L, V] f32 (dream.Dream.forward).
    logits_hook(logits) -> logits lets a test perturb the model output. margins: measure the Result margins.
    template (vdiff's structured output: gen_length entries, -1 where the model writes, else a token fixed
    there): its tokens are in the canvas from the start, so the steps count and commit only the other masks."""
    p = params
    if p.alg not in ALGS:
        raise ValueError(f"unknown alg {p.alg}")
    if p.gen_length < 1 or p.steps < 1:
        raise ValueError("gen_length and steps must be >= 1")
    if p.temperature < 0 or (p.alg_temp is not None and p.alg_temp < 0):
        raise ValueError("temperature and alg_temp must be >= 0")
    plen = len(prompt)
    x = torch.full((plen + p.gen_length,), mask_id, dtype=torch.long)
    x[:plen] = torch.tensor(prompt, dtype=torch.long)
    if template is not None:
        if len(template) != p.gen_length:
            raise ValueError("a template has gen_length entries")
        for q, t in enumerate(template):
            if t != -1:
                x[plen + q] = t
    ts = timesteps(p.steps, p.eps)
    gen = torch.Generator().manual_seed(seed)
    result = Result(canvas=[], answer=[])

    for i in range(p.steps):
        masked = (x == mask_id).nonzero()[:, 0]
        n = int(masked.numel())
        logits = model(x)
        if logits_hook is not None:
            logits = logits_hook(logits)
        rows = logits[masked]
        commits: list[tuple[int, int, float, float]] = []

        if p.alg == "origin":
            p_transfer = 1.0 if i == p.steps - 1 else float(np.float32(np.float32(1.0) - np.float32(ts[i + 1] / ts[i])))
            reveal = torch.rand(n, generator=gen) < p_transfer
            chosen = masked[reveal]
            result.counts.append(int(chosen.numel()))
            if chosen.numel():
                x0, prob, conf = sample_tokens(rows[reveal], p, gen)
                for pos, tok, pr, cf in zip(chosen.tolist(), x0.tolist(), prob.tolist(), conf.tolist()):
                    commits.append((pos - plen, tok, pr, cf))
                    x[pos] = tok
            result.trace.append(commits)
            continue

        k = transfer_count(n, i, p.steps, ts)
        result.counts.append(k)
        if margins and i < p.steps - 1 and n > 0:
            frac = transfer_fraction_f64(n, i, ts)
            if frac != round(frac):
                result.count_margin = min(result.count_margin, abs(frac - round(frac)))
            elif int(frac) != k:
                result.count_margin = 0.0
        if n == 0 or k == 0:
            result.trace.append(commits)
            continue
        x0, prob, conf = sample_tokens(rows, p, gen)
        if margins and p.top_p is not None and p.top_p < 1:
            result.top_p_margin = min(result.top_p_margin, top_p_gap(rows, p.temperature, p.top_p))
        if p.alg_temp:
            weights = torch.softmax(conf / p.alg_temp, dim=-1)
            picked = torch.multinomial(weights, k, replacement=False, generator=gen)
        else:
            order = torch.sort(conf, descending=True, stable=True).indices  # ties: lower position first
            picked = order[:k]
            if margins and k < n:
                result.select_margin = min(result.select_margin,
                                           selection_gap(p.alg, float(conf[order[k - 1]]), float(conf[order[k]])))
        if margins and p.temperature == 0:
            for j in picked.tolist():
                top = rows[j].topk(2).values
                result.token_margin = min(result.token_margin, float(top[0] - top[1]))
        for j in sorted(picked.tolist()):
            pos = int(masked[j])
            tok = int(x0[j])
            commits.append((pos - plen, tok, float(prob[j]), float(conf[j])))
            x[pos] = tok
        result.trace.append(commits)

    result.canvas = x.tolist()
    result.answer = result.canvas[plen:]
    return result
