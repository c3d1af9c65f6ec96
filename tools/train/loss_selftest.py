#!/usr/bin/python3
"""Checks train.py's diffusion_loss options against what they are meant to compute. Exits non-zero on the
first disagreement; a few seconds on the CPU.

    /usr/bin/python3 tools/train/loss_selftest.py

1. Without options: the LLaDA loss written out by hand (sum over masked positions of CE / t over the maskable
   count), with the same random draws.
2. --semi-ar 1: every row the model sees is clean before a cut, masked (at ratio t) only inside the block that
   follows it and masked everywhere after the block; positions outside the answer (maskable False) are never
   masked; the loss is the block's CE / t over the block length.
3. --certainty: the extra term is the mean entropy of the predictions at the masked positions whose argmax is
   the token, computed by hand; zero where no masked position is predicted right; --certainty-above keeps only
   the positions whose token has at least that probability.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import EPS, diffusion_loss  # noqa: E402

VOCAB, MASK = 16, 15


class Recorder(torch.nn.Module):
    """A stand-in model: fixed logits per (position, token id) from a table, and a record of every input."""

    def __init__(self, length, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(3 * torch.randn(length, VOCAB + 1, VOCAB, generator=g))
        self.seen = []

    def forward(self, tokens):
        self.seen.append(tokens.clone())
        positions = torch.arange(tokens.shape[1])[None, :].expand_as(tokens)
        return self.table[positions, tokens]


def check(ok, what):
    if not ok:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}")


def draws(b, length, seed):
    """The draws diffusion_loss makes first, in its order: t per row, then one uniform per position."""
    g = torch.Generator().manual_seed(seed)
    t = (1 - EPS) * torch.rand(b, generator=g) + EPS
    return t, torch.rand(b, length, generator=g)


def main():
    b, length = 6, 24
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, MASK, (b, length), generator=g)
    maskable = torch.ones(b, length, dtype=torch.bool)
    maskable[:, :2] = False  # a prompt that is never masked
    maskable[0, :10] = False

    # 1. The plain loss.
    model = Recorder(length, 0)
    loss = diffusion_loss(model, tokens, maskable, MASK, torch.Generator().manual_seed(7), False)
    t, u = draws(b, length, 7)
    masked = (u < t[:, None]) & maskable
    check(torch.equal(model.seen[0], torch.where(masked, MASK, tokens)), "plain: the input masks as drawn")
    ce = F.cross_entropy(model(model.seen[0]).view(-1, VOCAB), tokens.view(-1), reduction="none").view(b, length)
    expected = ((ce * masked / t[:, None]).sum(1) / maskable.sum(1)).mean()
    check(torch.allclose(loss, expected, rtol=1e-6), f"plain: loss {loss.item():.6f} = {expected.item():.6f}")

    # 2. Semi-autoregressive rows.
    for seed in range(20):
        block = 1 + seed % 5
        model = Recorder(length, seed)
        loss = diffusion_loss(model, tokens, maskable, MASK, torch.Generator().manual_seed(seed), False,
                              semi_ar=1.0, semi_block=block)
        noisy = model.seen[0]
        logits = model(noisy)
        ce = F.cross_entropy(logits.view(-1, VOCAB), tokens.view(-1), reduction="none").view(b, length)
        for row in range(b):
            hidden = noisy[row] == MASK
            check(not hidden[~maskable[row]].any(), f"semi-ar seed {seed} row {row}: the prompt stays clean")
            check(torch.equal(noisy[row][~hidden], tokens[row][~hidden]),
                  f"semi-ar seed {seed} row {row}: what is not masked is the text")
        # Redo the function's draws in its order (t, the uniform mask, which rows, then per row the cut and the
        # block's mask) and check the input and the loss against them.
        g = torch.Generator().manual_seed(seed)
        t = (1 - EPS) * torch.rand(b, generator=g) + EPS
        torch.rand(b, length, generator=g)
        rows = (torch.rand(b, generator=g) < 1.0).nonzero()[:, 0].tolist()
        expected = 0.0
        for row in rows:
            places = maskable[row].nonzero()[:, 0]
            cut = int(torch.randint(len(places), (1,), generator=g))
            span = places[cut:cut + block]
            picked = torch.rand(len(span), generator=g) < t[row]
            where = f"semi-ar seed {seed} row {row}"
            check(torch.equal(noisy[row, span] == MASK, picked), f"{where}: the block masked at t")
            check(bool((noisy[row, places[cut + block:]] == MASK).all()), f"{where}: all masked after the block")
            check(not bool((noisy[row, places[:cut]] == MASK).any()), f"{where}: clean before the cut")
            expected += float((ce[row, span] * picked).sum() / t[row] / block)
        expected /= b
        check(abs(loss.item() - expected) < 1e-5 * max(1.0, abs(expected)),
              f"semi-ar seed {seed} block {block}: loss {loss.item():.6f} = {expected:.6f}")

    # 3. Certainty forcing.
    model = Recorder(length, 5)
    base = diffusion_loss(model, tokens, maskable, MASK, torch.Generator().manual_seed(11), False)
    terms = []
    for above in (0.0, 0.6):
        forced = diffusion_loss(model, tokens, maskable, MASK, torch.Generator().manual_seed(11), False,
                                certainty=0.5, certainty_above=above)
        logits = model(model.seen[0])
        masked = model.seen[0] == MASK
        p = F.softmax(logits, -1)
        right = masked & (logits.argmax(-1) == tokens) & (p.gather(-1, tokens[..., None])[..., 0] >= above)
        entropy = -(p * p.log()).sum(-1)
        term = float(entropy[right].sum() / max(1, int(right.sum())))
        check(int(right.sum()) > 0, f"certainty above {above}: the case has positions predicted right")
        check(abs(forced.item() - base.item() - 0.5 * term) < 1e-5,
              f"certainty above {above}: the term is 0.5 x mean entropy where right ({term:.5f})")
        terms.append((term, int(right.sum())))
    check(terms[1][1] < terms[0][1], f"certainty above 0.6 keeps fewer positions ({terms[1][1]} of {terms[0][1]})")
    with torch.no_grad():
        model.table.copy_(torch.zeros_like(model.table))
        model.table[..., MASK - 1] = 5.0  # every prediction is token 14, which never occurs in `tokens`
    tokens_without = tokens.clamp(max=MASK - 2)
    plain = diffusion_loss(model, tokens_without, maskable, MASK, torch.Generator().manual_seed(12), False)
    forced = diffusion_loss(model, tokens_without, maskable, MASK, torch.Generator().manual_seed(12), False,
                            certainty=2.0)
    check(abs(forced.item() - plain.item()) < 1e-6, "certainty: no term where nothing is predicted right")
    print("all checks passed")


if __name__ == "__main__":
    main()
