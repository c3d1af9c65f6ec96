"""LLaDA's reference generate() semantics, written independently, generalised, and traced.

Reference behaviour (ML-GSAI/LLaDA generate.py), reproduced exactly where its asserts hold:
  * canvas = prompt + gen_length mask tokens; the answer is filled block by block (semi-autoregressive);
  * a block with M masked positions (counted before its first step) and steps_b steps commits M // steps_b
    tokens at each step, plus one more at each of the first M % steps_b steps;
  * each step: logits of the whole canvas. With cfg_scale > 0 an unconditional copy of the canvas, with the
    prompt positions set to the mask token, runs in the same batch and
        logits = un + (cfg_scale + 1) * (cond - un);
  * logits_eos_inf: logits[..., eos] = -inf before anything else reads the logits (so x0 is never EOS);
  * x0 = argmax(logits) at temperature 0; otherwise Gumbel-max in float64:
        argmax(exp(logits) / (-log U) ** temperature), U ~ uniform[0, 1) per vocabulary entry;
  * confidence_eos_eot_inf: the reference writes
        logits_with_noise[..., eos] = logits[..., eot] = -inf
    AFTER x0 is taken, so it never changes x0; it only changes the softmax below. At temperature 0 the
    reference's logits_with_noise IS the logits tensor (same object), so both EOS and EOT become -inf in the
    logits; at temperature > 0 it is a separate float64 tensor, so only EOT becomes -inf in the logits.
    A position whose x0 is EOS/EOT then gets probability exactly 0 (not -inf): it is still committed when
    its block has no other masks left, just as late as possible;
  * low_confidence: confidence = softmax(logits)[x0]; random: confidence ~ uniform[0, 1);
    the softmax is taken in float64 (as older reference versions do; the newest one takes it in the
    model's dtype, which for f32 logits only changes the last bits);
  * confidence = -inf at positions beyond the current block's end and at positions that are not masks;
  * the k most confident positions are committed (k from the block's schedule for this step).
    Ties in confidence are broken towards the lower position (torch.topk leaves this unspecified).

Generalisation (the reference asserts gen_length % block_length == 0 and steps % num_blocks == 0):
  * num_blocks = ceil(gen_length / block_length); block b covers answer positions
    [b * block_length, min((b + 1) * block_length, gen_length)), so only the last block may be shorter;
  * steps over blocks: base = steps // num_blocks, rem = steps % num_blocks; block b gets
        steps_b = base + (1 if b < rem else 0), then clamped to [1, len_b].
    In the reference case (both divisible) this is steps // num_blocks for every block; the upper clamp
    only drops steps that would commit nothing (the reference runs them as no-op forwards), so the tokens
    are identical. The lower clamp means steps < num_blocks still runs one step per block.
  * within a block the reference schedule above applies unchanged with M = len_b.

Template (vdiff's structured output, `template=`: gen_length entries, -1 where the model writes, else a token
fixed there; no reference loop has one): its tokens are in the canvas from the start (the "prompt" of
cfg_scale stays the prompt); a block's M counts its masks only, its steps are clamped to [1, M], and a block
without masks takes no step.

Each committed token is recorded per step as (answer position, token, probability) where probability is
the float64 softmax probability of the committed token at the step it was committed, computed from the
same logits the confidence uses (so for low_confidence it is the confidence itself).

Only low_confidence at temperature 0 is meant to match the native engine token for token: temperature > 0
and random remasking draw from torch's RNG here, the native engine uses its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass
class Params:
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"  # or "random"
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eot_token_id: int = -1  # -1: none


def block_schedule(gen_length: int, block_length: int, steps: int) -> list[tuple[int, int, int]]:
    """[(start, end, steps_b)] over the answer, by the rule in the module docstring."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError("gen_length, block_length and steps must be >= 1")
    num_blocks = math.ceil(gen_length / block_length)
    base, rem = divmod(steps, num_blocks)
    blocks = []
    for b in range(num_blocks):
        start = b * block_length
        end = min(start + block_length, gen_length)
        steps_b = base + (1 if b < rem else 0)
        blocks.append((start, end, min(max(steps_b, 1), end - start)))
    return blocks


def transfer_counts(masks: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps for `masks` masked positions: the remainder goes first."""
    base, rem = divmod(masks, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass
class Result:
    tokens: torch.Tensor                      # [B, prompt + gen_length] final canvas
    trace: list[list[list[tuple[int, int, float]]]] = field(default_factory=list)  # [row][step][commit]
    token_margin: float = math.inf            # min top1 - top2 logit gap at committed positions (temp 0)
    select_margin: float = math.inf           # min log-confidence gap at the top-k boundary (low_confidence)

    def commits(self) -> list[list[list[tuple[int, int]]]]:
        """The trace without probabilities: which (position, token) each step committed."""
        return [[[(pos, tok) for pos, tok, _ in step] for step in row] for row in self.trace]


def log_gap(higher: float, lower: float) -> float:
    """How far apart two confidences are, as a difference of logs (0 for an exact tie)."""
    if higher == lower:
        return 0.0
    if lower <= 0:
        return math.inf
    return math.log(higher) - math.log(lower)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, params: Params, mask_id: int, eos_id: int,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             logits_hook=None, margins: bool = False, template: list[int] | None = None) -> Result:
    """prompt [B, Lp] int64 (every row shares params). attention_mask [B, Lp] marks real prompt tokens
    (left padding), as in the reference. logits_hook(logits) -> logits lets a test perturb the model output.
    margins: also measure Result.token_margin and Result.select_margin (costs time; off for benchmarks).
    """
    p = params
    if p.remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {p.remasking}")
    eot_id = p.eot_token_id
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + p.gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.bool(), torch.ones(batch, p.gen_length, dtype=torch.bool)], dim=1)
    prompt_index = x != mask_id
    if template is not None:
        if len(template) != p.gen_length or all(t == -1 for t in template):
            raise ValueError("a template has gen_length entries, at least one of them -1 and one not")
        for q, t in enumerate(template):
            if t != -1:
                x[:, prompt_len + q] = t
    result = Result(tokens=x, trace=[[] for _ in range(batch)])

    def model_logits(canvas: torch.Tensor) -> torch.Tensor:
        if p.cfg_scale > 0:
            uncond = canvas.clone()
            uncond[prompt_index] = mask_id
            mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
            both = model(torch.cat([canvas, uncond], dim=0), mask2)
            cond, un = both[:batch], both[batch:]
            return un + (p.cfg_scale + 1) * (cond - un)
        return model(canvas, attention_mask)

    for start, end, steps_b in block_schedule(p.gen_length, p.block_length, p.steps):
        block_masks = (x[:, prompt_len + start:prompt_len + end] == mask_id).sum(dim=1).tolist()
        if template is not None:  # every row has the template's masks
            if block_masks[0] == 0:
                continue
            steps_b = min(steps_b, block_masks[0])
        counts = [transfer_counts(m, steps_b) for m in block_masks]
        for step in range(steps_b):
            mask_index = x == mask_id
            logits = model_logits(x)
            if logits_hook is not None:
                logits = logits_hook(logits)
            if p.logits_eos_inf:
                logits[:, :, eos_id] = NEG_INF

            if p.temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                x0 = (logits.double().exp() / (-torch.log(noise)) ** p.temperature).argmax(dim=-1)

            conf_logits = logits.clone()
            if p.confidence_eos_eot_inf:
                if p.temperature == 0:  # the reference's noisy logits alias the logits only at temperature 0
                    conf_logits[:, :, eos_id] = NEG_INF
                if eot_id >= 0:
                    conf_logits[:, :, eot_id] = NEG_INF
            prob = torch.softmax(conf_logits.double(), dim=-1)
            x0_prob = prob.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # [B, L] float64

            if p.remasking == "low_confidence":
                x0_p = x0_prob.clone()
            else:
                x0_p = torch.rand(x0.shape, generator=generator, dtype=torch.float64)
            x0_p[:, prompt_len + end:] = NEG_INF
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, NEG_INF))

            for row in range(batch):
                k = counts[row][step]
                # Stable descending sort: equal confidences keep position order, so ties go to the lower position.
                order = torch.sort(confidence[row], descending=True, stable=True).indices
                chosen = sorted(order[:k].tolist())
                if margins and p.remasking == "low_confidence" and 0 < k < len(order):
                    last, competitor = confidence[row, order[k - 1]].item(), confidence[row, order[k]].item()
                    if competitor != NEG_INF:  # a masked position of this block was left out
                        result.select_margin = min(result.select_margin, log_gap(last, competitor))
                if margins and p.temperature == 0:
                    # A committed token is fragile if its argmax is nearly tied. With confidence_eos_eot_inf an
                    # argmax flip to or from EOS/EOT also jumps the confidence (to or from 0), so then every
                    # candidate of the block counts.
                    watched = order[:len(order) if p.confidence_eos_eot_inf else k].tolist()
                    for pos in watched:
                        if confidence[row, pos] == NEG_INF:
                            break
                        top2 = logits[row, pos].topk(2).values
                        result.token_margin = min(result.token_margin, float(top2[0] - top2[1]))
                commits = []
                for pos in chosen:
                    assert confidence[row, pos] != NEG_INF, "committed a position outside the block"
                    tok = int(x0[row, pos])
                    commits.append((pos - prompt_len, tok, float(x0_prob[row, pos])))
                    x[row, pos] = tok
                result.trace[row].append(commits)
    return result
