#!/usr/bin/python3
"""Trains the embedded Shakespeare model with LLaDA's masked-diffusion objective.

Pretraining: every sequence draws t ~ U(eps, 1), each maskable token is replaced by the mask token with
probability t, and the loss is the cross-entropy on the masked tokens weighted by 1/t, summed and divided
by the number of maskable tokens (the sequence length, as in the LLaDA paper). From --sft-from on, half of
every batch is chat data (see data.py): only the answer is maskable and the loss is divided by the answer
length, as in LLaDA's SFT.

AdamW, linear warmup then cosine decay, fixed seed, float32 on the CPU (or with bf16 autocast: on a GPU,
--device cuda, gpu.sh; on the CPU, --cpu-bf16). A checkpoint (model, optimizer,
step, data RNG) is written every --ckpt-every steps; --resume continues from it.

A continuation stage (STAGE3.md) starts from an exported model directory instead of random weights
(--init-from, which may have a shorter max_sequence_length than --seq-len: RoPE has no learned positions),
may pad chat examples to a shorter length than the pretraining windows (--sft-len, a separate forward pass
in the same step) with their own number of rows (--sft-rows), and may keep an exponential moving average of
the weights (--ema) for exports taken while the learning rate is still high.

    nice -n 10 /usr/bin/python3 tools/train/train.py --tokenizer TOKDIR --corpus tinyshakespeare.txt --ckpt CKPT
"""
import argparse
import json
import math
import os
import random
import time

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))

from corpus import load_split
from data import Batches, Vocab, heldout_windows
from evaluate import masked_loss
from model import LLaDA, config_for

EPS = 1e-3  # smallest mask probability, as in LLaDA's forward process


def diffusion_loss(model, tokens, maskable, mask_id, gen, bf16, certainty=0.0, certainty_above=0.0, semi_ar=0.0,
                   semi_block=8):
    """LLaDA's loss for one batch: sum over masked tokens of CE / t, divided per row by its maskable count.

    certainty > 0 adds that weight times the mean entropy of the predictions at the masked positions the model
    already predicts right (argmax = the token): certainty forcing, as dParallel trains it, which makes the model
    sure where it is right so that threshold decoding commits more than one position a step. certainty_above > 0
    narrows it to the positions whose token already has at least that probability, so that the model's choice
    among words it is unsure of keeps its spread.

    semi_ar > 0 trains that share of the rows in the state semi-autoregressive decoding (blocks of semi_block)
    puts the model in, rather than under a uniformly random mask: the loss of such a row is the mean over its
    block of CE / t."""
    b, length = tokens.shape
    t = (1 - EPS) * torch.rand(b, generator=gen) + EPS
    masked = (torch.rand(b, length, generator=gen) < t[:, None]) & maskable
    hidden, scale = masked, maskable.sum(1)
    if semi_ar > 0:
        hidden, scale = masked.clone(), scale.clone()
        for row in (torch.rand(b, generator=gen) < semi_ar).nonzero()[:, 0].tolist():
            # The state semi-autoregressive decoding is in: the text before a cut is clean, the block after it is
            # masked at ratio t, everything after the block is masked; the loss is on the block alone.
            places = maskable[row].nonzero()[:, 0]
            cut = int(torch.randint(len(places), (1,), generator=gen))
            block, after = places[cut:cut + semi_block], places[cut + semi_block:]
            masked[row] = False
            masked[row, block] = torch.rand(len(block), generator=gen) < t[row]
            hidden[row] = masked[row]
            hidden[row, after] = True
            scale[row] = semi_block
    noisy = torch.where(hidden, torch.full_like(tokens, mask_id), tokens)
    # The draws above stay on the CPU generator whatever the device, so a GPU run masks as a CPU run does.
    device = next(model.parameters()).device
    tokens, masked, maskable, t = tokens.to(device), masked.to(device), maskable.to(device), t.to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(noisy.to(device))
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens.view(-1), reduction="none").view(b, length)
    per_row = (ce * masked / t[:, None]).sum(1) / scale.to(device)
    if certainty <= 0:
        return per_row.mean()
    logits = logits.float()
    right = masked & (logits.argmax(-1) == tokens)
    if certainty_above > 0:
        p_token = F.softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
        right &= p_token >= certainty_above
    log_p = F.log_softmax(logits[right], dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return per_row.mean() + certainty * entropy.sum() / right.sum().clamp(min=1)


def load_init(model, model_dir):
    """Copies an exported model directory's weights (bf16/f16 upcast exactly to float32) into `model`."""
    import safetensors_io

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "embedding_size", "mask_token_id",
                "eos_token_id", "bos_token_id"):
        if config[key] != model.config[key]:
            raise SystemExit(f"--init-from {model_dir}: {key} is {config[key]}, the model being trained has "
                             f"{model.config[key]}")
    weights = safetensors_io.load_dir(model_dir)
    own = model.state_dict()
    if set(weights) != set(own):
        raise SystemExit(f"--init-from {model_dir}: tensor names differ: "
                         f"{sorted(set(weights) ^ set(own))[:5]}")
    with torch.no_grad():
        for name, tensor in own.items():
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise SystemExit(f"--init-from {model_dir}: {name} has shape {tuple(weights[name].shape)}")
            tensor.copy_(weights[name].to(torch.float32))
    return config["max_sequence_length"]


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
    p.add_argument("--device", default="cpu", help="cpu, or cuda: float32 weights, bf16 autocast")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on the CPU too (float32 weights and optimizer, as on a GPU); with a bf16 dot "
                        "instruction (AVX512_BF16, AMX) its matrix products are several times the float32 ones")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="end the run (checkpointed) once this process has trained this long")
    p.add_argument("--keep-best", default=None,
                   help="file that gets the EMA (else live) weights whenever the held-out probe at 0.5 improves")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--mlp-hidden", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sft-from", type=int, default=None, help="step from which half of each batch is chat data")
    p.add_argument("--sft-rows", type=int, default=None,
                   help="chat rows in each batch from --sft-from on (default: half of --batch); the rest pretrain")
    p.add_argument("--sft-len", type=int, default=None,
                   help="length chat examples are padded to (default: --seq-len); a separate forward if shorter")
    p.add_argument("--random-length", type=float, default=0.0,
                   help="probability that a step's pretraining rows are cut to one length drawn from [64, --seq-len]")
    p.add_argument("--sft-fit", action="store_true",
                   help="pad a step's chat rows only to the longest of them (rounded up to 16), not to --sft-len")
    p.add_argument("--sft-packed", action="store_true",
                   help="chat rows are conversations of consecutive speeches filling --sft-len, with no EOS padding")
    p.add_argument("--sft-echo", type=float, default=0.0,
                   help="with --sft-packed: the share of conversations that start at a reply taking up the line")
    p.add_argument("--init-from", default=None,
                   help="model directory (config.json + model.safetensors) whose weights start a fresh run")
    p.add_argument("--ema", type=float, default=None,
                   help="keep an exponential moving average of the weights with this decay (checkpoint key 'ema')")
    p.add_argument("--ema-warmup", action="store_true",
                   help="ramp the EMA decay up as (1 + step) / (10 + step) until it reaches --ema")
    p.add_argument("--certainty", type=float, default=0.0,
                   help="weight of the entropy at masked positions predicted right (certainty forcing)")
    p.add_argument("--certainty-above", type=float, default=0.0,
                   help="certainty forcing only where the token's probability is at least this")
    p.add_argument("--semi-ar", type=float, default=0.0,
                   help="share of rows masked as semi-autoregressive decoding sees them (clean text, a block "
                        "masked at ratio t, all masked after it)")
    p.add_argument("--semi-block", type=int, default=8, help="the block length of --semi-ar rows")
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
    if args.sft_echo > 0 and not args.sft_packed:
        p.error("--sft-echo picks where packed conversations start: it needs --sft-packed")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vocab = Vocab(args.tokenizer)
    train_text, heldout_text = load_split(args.corpus)
    sft_len = args.sft_len or args.seq_len
    batches = Batches(vocab, train_text, args.seq_len, args.seed, sft_len=sft_len,
                      random_length=args.random_length, sft_fit=args.sft_fit, sft_packed=args.sft_packed,
                      sft_echo=args.sft_echo)
    sft_rows = args.batch // 2 if args.sft_rows is None else args.sft_rows
    # A small fixed slice of the held-out windows, for a progress signal only (evaluate.py reports the rest).
    probe = heldout_windows(vocab, heldout_text, args.seq_len)[:32]
    config = config_for(args.d_model, args.n_heads, args.n_layers, args.mlp_hidden, vocab.size, args.seq_len,
                        vocab.special_ids())
    device = torch.device(args.device)
    bf16 = device.type == "cuda" or args.cpu_bf16
    model = LLaDA(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, elapsed_before = 0, 0.0
    resuming = args.resume and os.path.exists(args.ckpt)
    if args.init_from is not None and not resuming:
        init_len = load_init(model, args.init_from)
        print(f"initialised from {args.init_from} (trained at context {init_len})", flush=True)
    ema = None
    if args.ema is not None:
        ema = {n: t.detach().clone() for n, t in model.state_dict().items()}
    if resuming:
        state = torch.load(args.ckpt, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        batches.rng.setstate(state["data_rng"])
        step, elapsed_before = state["step"], state["elapsed"]
        if ema is not None:
            if "ema" not in state:
                raise SystemExit(f"{args.ckpt} has no EMA weights; resume without --ema or start a new run")
            ema = state["ema"]
        print(f"resumed at step {step}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    echo = f"replies taking up the line {len(batches.echo_starts)}; " if args.sft_echo > 0 else ""
    print(f"parameters {n_params} ({n_params / 1e6:.2f}M); train tokens {len(batches.ids)}; "
          f"chat examples {len(batches.chat)}; {echo}config {config}", flush=True)

    def save(path):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gen": gen.get_state(),
                    "data_rng": batches.rng.getstate(), "step": step, "config": config, "args": vars(args),
                    "elapsed": elapsed_before + time.time() - start_time,
                    **({"ema": ema} if ema is not None else {})}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def forward(tokens):
        """The probe's forward: CPU tokens in, float32 CPU logits out, on whatever device the model is."""
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(tokens.to(device)).float().cpu()

    def loss_of(tokens, maskable):
        return diffusion_loss(model, tokens, maskable, vocab.mask, gen, bf16, args.certainty, args.certainty_above,
                              args.semi_ar, args.semi_block)

    best = math.inf
    start_time = time.time()
    last_log, tokens_since = time.time(), 0
    model.train()
    last_step = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    while step < last_step:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        separate = sft_len != args.seq_len or args.random_length > 0 or args.sft_fit or args.sft_packed
        if args.sft_from is not None and step >= args.sft_from and separate:
            # Two lengths cannot share a tensor: the mean over all rows, from one forward per length.
            pre_tokens, pre_mask = batches.pretrain(args.batch - sft_rows)
            sft_tokens, sft_mask = batches.sft(sft_rows)
            pre_loss = loss_of(pre_tokens, pre_mask)
            sft_loss = loss_of(sft_tokens, sft_mask)
            loss = (pre_loss * (args.batch - sft_rows) + sft_loss * sft_rows) / args.batch
            n_tokens = pre_tokens.numel() + sft_tokens.numel()
        else:
            if args.sft_from is not None and step >= args.sft_from:
                pre_tokens, pre_mask = batches.pretrain(args.batch - sft_rows)
                sft_tokens, sft_mask = batches.sft(sft_rows)
                tokens, maskable = torch.cat([pre_tokens, sft_tokens]), torch.cat([pre_mask, sft_mask])
            else:
                tokens, maskable = batches.pretrain(args.batch)
            loss = loss_of(tokens, maskable)
            n_tokens = tokens.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            # --ema-warmup: the decay grows as (1 + step) / (10 + step) up to --ema, so that a short run's average
            # is not still partly its random initial weights (0.999 keeps 7% of them after 2,600 steps).
            ema_decay = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema
            with torch.no_grad():
                for name, tensor in model.state_dict().items():
                    ema[name].mul_(ema_decay).add_(tensor, alpha=1 - ema_decay)
        step += 1
        tokens_since += n_tokens
        timed_out = args.max_minutes is not None and time.time() - start_time > 60 * args.max_minutes

        if step % args.log_every == 0:
            now = time.time()
            print(f"step {step} loss {loss.item():.4f} lr {learning_rate(step - 1, args):.2e} "
                  f"tok/s {tokens_since / (now - last_log):.0f} elapsed {elapsed_before + now - start_time:.1f}s",
                  flush=True)
            last_log, tokens_since = now, 0
        if step % args.eval_every == 0 or step == args.steps or timed_out:
            model.eval()
            probe_losses = [masked_loss(forward, probe, r, vocab.mask) for r in (0.15, 0.5, 1.0)]
            model.train()
            print(f"step {step} heldout-probe loss@0.15 {probe_losses[0]:.4f} @0.5 {probe_losses[1]:.4f} "
                  f"@1.0 {probe_losses[2]:.4f}", flush=True)
            if ema is not None:
                live = {n: t.detach().clone() for n, t in model.state_dict().items()}
                model.load_state_dict(ema)
                ema_losses = [masked_loss(forward, probe, r, vocab.mask) for r in (0.15, 0.5, 1.0)]
                model.load_state_dict(live)
                model.train()
                print(f"step {step} heldout-probe ema loss@0.15 {ema_losses[0]:.4f} @0.5 {ema_losses[1]:.4f} "
                      f"@1.0 {ema_losses[2]:.4f}", flush=True)
            kept = (ema_losses if ema is not None else probe_losses)[1]
            if args.keep_best is not None and kept < best:
                best = kept
                torch.save({"weights": ema if ema is not None else model.state_dict(), "config": config,
                            "step": step, "probe@0.5": kept}, args.keep_best)
                print(f"step {step} kept as the best so far ({args.keep_best})", flush=True)
        if step % args.ckpt_every == 0 or step == last_step or timed_out:
            save(args.ckpt)
        if timed_out:
            print(f"stopped at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    print(f"done: {step} steps, wall time {elapsed_before + time.time() - start_time:.0f}s", flush=True)


if __name__ == "__main__":
    random.seed(0)
    main()
