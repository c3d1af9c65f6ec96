#!/usr/bin/python3
"""Trains the embedded Shakespeare model with LLaDA's masked-diffusion objective.

Pretraining: every sequence draws t ~ U(eps, 1), each maskable token is replaced by the mask token with
probability t, and the loss is the cross-entropy on the masked tokens weighted by 1/t, summed and divided
by the number of maskable tokens (the sequence length, as in the LLaDA paper). From --sft-from on, half of
every batch is chat data (see data.py): only the answer is maskable and the loss is divided by the answer
length, as in LLaDA's SFT.

AdamW, linear warmup then cosine decay, fixed seed, float32 on the CPU. A checkpoint (model, optimizer,
step, data RNG) is written every --ckpt-every steps; --resume continues from it.

    nice -n 10 /usr/bin/python3 tools/train/train.py --tokenizer TOKDIR --corpus tinyshakespeare.txt --ckpt CKPT
"""
import argparse
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from corpus import load_split
from data import Batches, Vocab, heldout_windows
from evaluate import masked_loss
from model import LLaDA, config_for

EPS = 1e-3  # smallest mask probability, as in LLaDA's forward process


def diffusion_loss(model, tokens, maskable, mask_id, gen):
    """LLaDA's loss for one batch: sum over masked tokens of CE / t, divided per row by its maskable count."""
    b, length = tokens.shape
    t = (1 - EPS) * torch.rand(b, generator=gen) + EPS
    masked = (torch.rand(b, length, generator=gen) < t[:, None]) & maskable
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    logits = model(noisy)
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), tokens.view(-1), reduction="none").view(b, length)
    per_row = (ce * masked / t[:, None]).sum(1) / maskable.sum(1)
    return per_row.mean()


def learning_rate(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json from bpe.py")
    p.add_argument("--corpus", required=True)
    p.add_argument("--ckpt", required=True, help="checkpoint file written during and at the end of training")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--mlp-hidden", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sft-from", type=int, default=None, help="step from which half of each batch is chat data")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=None,
                   help="end the run after this step (checkpointed), leaving the schedule as for --steps")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = Vocab(args.tokenizer)
    train_text, heldout_text = load_split(args.corpus)
    batches = Batches(vocab, train_text, args.seq_len, args.seed)
    # A small fixed slice of the held-out windows, for a progress signal only (evaluate.py reports the rest).
    probe = heldout_windows(vocab, heldout_text, args.seq_len)[:32]
    config = config_for(args.d_model, args.n_heads, args.n_layers, args.mlp_hidden, vocab.size, args.seq_len,
                        vocab.special_ids())
    model = LLaDA(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed_before = 0, 0.0
    if args.resume and os.path.exists(args.ckpt):
        state = torch.load(args.ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        batches.rng.setstate(state["data_rng"])
        step, elapsed_before = state["step"], state["elapsed"]
        print(f"resumed at step {step}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params} ({n_params / 1e6:.2f}M); train tokens {len(batches.ids)}; "
          f"chat examples {len(batches.chat)}; config {config}", flush=True)

    def save(path):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gen": gen.get_state(),
                    "data_rng": batches.rng.getstate(), "step": step, "config": config, "args": vars(args),
                    "elapsed": elapsed_before + time.time() - start_time}, path + ".tmp")
        os.replace(path + ".tmp", path)

    start_time = time.time()
    last_log, tokens_since = time.time(), 0
    model.train()
    last_step = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    while step < last_step:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        if args.sft_from is not None and step >= args.sft_from:
            half = args.batch // 2
            pre_tokens, pre_mask = batches.pretrain(args.batch - half)
            sft_tokens, sft_mask = batches.sft(half)
            tokens, maskable = torch.cat([pre_tokens, sft_tokens]), torch.cat([pre_mask, sft_mask])
        else:
            tokens, maskable = batches.pretrain(args.batch)
        loss = diffusion_loss(model, tokens, maskable, vocab.mask, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_since += tokens.numel()

        if step % args.log_every == 0:
            now = time.time()
            print(f"step {step} loss {loss.item():.4f} lr {learning_rate(step - 1, args):.2e} "
                  f"tok/s {tokens_since / (now - last_log):.0f} elapsed {elapsed_before + now - start_time:.0f}s",
                  flush=True)
            last_log, tokens_since = now, 0
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            probe_losses = [masked_loss(model, probe, r, vocab.mask) for r in (0.15, 0.5, 1.0)]
            model.train()
            print(f"step {step} heldout-probe loss@0.15 {probe_losses[0]:.4f} @0.5 {probe_losses[1]:.4f} "
                  f"@1.0 {probe_losses[2]:.4f}", flush=True)
        if step % args.ckpt_every == 0 or step == last_step:
            save(args.ckpt)
    print(f"done: {step} steps, wall time {elapsed_before + time.time() - start_time:.0f}s", flush=True)


if __name__ == "__main__":
    random.seed(0)
    main()
