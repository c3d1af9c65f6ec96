"""Training and evaluation data for the Shakespeare diffusion model, as token ids.

Pretraining samples are BOS followed by a window of the corpus starting at a random token (what a plain
completion prompt looks like: the server encodes prompts with BOS first). Chat samples turn two consecutive
speeches by different speakers into a user turn and an assistant turn rendered exactly as the chat
template in tokenizer_config.json renders them, then padded with EOS up to the sequence length, as in
LLaDA's SFT.

Two options of the continuation stage (STAGE3.md, session 2) change the shapes, both off by default so that
earlier runs reproduce: `random_length` cuts a step's pretraining rows to one length drawn uniformly from
[64, seq_len] with that probability (LLaDA trains 1% of its rows at a random length), so that a canvas
ending short of seq_len does not mean "EOS padding follows"; `sft_fit` pads a step's chat rows only to
the longest of them (rounded up to 16) instead of to sft_len, so that they hold far fewer EOS targets.

A third (STAGE3.md, session 3), `sft_packed`, replaces the padded pairs: a chat row is a conversation of
consecutive speeches, user and assistant turns alternating, each closed by <|eot_id|>, filling the row with
no EOS at all; everything from the first assistant answer on may be masked. The model then learns that an
answer ends with <|eot_id|> and that another turn follows it, never "masked positions near the end are EOS
padding", which made the padded models commit EOS first and end almost every answer at once.

A fourth (STAGE3.md, session 5), `sft_echo`, starts that share of the packed conversations at a line whose
reply takes up one of its words (`replies_taking_up`), so that the model learns to answer what was said
rather than with any speech.
"""
import collections
import json
import os
import random

import torch

from bpe import BOS, END_HEADER, EOS, EOT, MASK, START_HEADER, Encoder
from corpus import words


class Vocab:
    def __init__(self, tokenizer_dir):
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer_json = json.load(f)
        self.encoder = Encoder(tokenizer_json)
        special = self.encoder.special
        self.size = max(special.values()) + 1
        self.bos, self.eos, self.mask = special[BOS], special[EOS], special[MASK]
        self.start_header, self.end_header, self.eot = special[START_HEADER], special[END_HEADER], special[EOT]

    def special_ids(self):
        return {"bos": self.bos, "eos": self.eos, "mask": self.mask}


def speeches(text):
    """[(speaker, speech text)] from the play text: blocks separated by blank lines, "NAME:" first."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], "\n".join(lines[1:]).strip()))
    return out


def replies_taking_up(turns, train_text, common=120, max_line_words=30, max_reply_words=40):
    """Indices i where speech i + 1 answers speech i by taking up one of its words: a different speaker, a
    short line and reply, and a word they share that is not among the `common` most frequent words of the
    training text ("Well, let it strike." / "Why let it strike?"). About one pair in nine."""
    frequent = {w for w, _ in collections.Counter(words(train_text)).most_common(common)}
    out = []
    for i, ((speaker_a, a), (speaker_b, b)) in enumerate(zip(turns, turns[1:])):
        line, reply = words(a), words(b)
        if speaker_a == speaker_b or len(line) > max_line_words or len(reply) > max_reply_words:
            continue
        if set(line) & set(reply) - frequent:
            out.append(i)
    return out


def chat_tokens(vocab, user, assistant):
    """(ids, index where the assistant's answer starts) for one user/assistant exchange.

    Pieces between special tokens are encoded separately, which is how @huggingface/tokenizers encodes a
    rendered template (it splits on added tokens before pre-tokenizing).
    """
    enc = vocab.encoder.encode
    ids = [vocab.bos, vocab.start_header] + enc("user") + [vocab.end_header] + enc("\n\n" + user.strip()) + [vocab.eot]
    ids += [vocab.start_header] + enc("assistant") + [vocab.end_header] + enc("\n\n")
    answer_start = len(ids)
    ids += enc(assistant.strip()) + [vocab.eot]
    return ids, answer_start


def chat_examples(vocab, text, seq_len, min_answer_room=8):
    """Consecutive speeches by different speakers as (ids padded to seq_len, answer start, unpadded length);
    over-long pairs are skipped."""
    examples = []
    turns = speeches(text)
    for (speaker_a, a), (speaker_b, b) in zip(turns, turns[1:]):
        if speaker_a == speaker_b:
            continue
        ids, answer_start = chat_tokens(vocab, a, b)
        if len(ids) + min_answer_room > seq_len:
            continue
        examples.append((ids + [vocab.eos] * (seq_len - len(ids)), answer_start, len(ids)))
    return examples


class Batches:
    """Random pretraining windows and chat examples, drawn from one seeded generator."""

    def __init__(self, vocab, train_text, seq_len, seed, sft_len=None, random_length=0.0, sft_fit=False,
                 sft_packed=False, sft_echo=0.0):
        self.vocab = vocab
        self.sft_packed = sft_packed
        self.sft_echo = sft_echo
        if sft_packed:
            turns = speeches(train_text)
            self.turns = [vocab.encoder.encode("\n\n" + text.strip()) for _, text in turns]
            self.echo_starts = replies_taking_up(turns, train_text) if sft_echo > 0 else []
        self.seq_len = seq_len
        self.sft_len = sft_len or seq_len
        self.random_length = random_length
        self.sft_fit = sft_fit
        self.ids = torch.tensor(vocab.encoder.encode(train_text), dtype=torch.long)
        self.chat = chat_examples(vocab, train_text, self.sft_len)
        self.rng = random.Random(seed)

    def pretrain(self, batch):
        length = self.seq_len
        if self.random_length > 0 and self.rng.random() < self.random_length:
            length = self.rng.randint(min(64, self.seq_len), self.seq_len)
        starts = [self.rng.randrange(0, len(self.ids) - self.seq_len) for _ in range(batch)]
        rows = [torch.cat([torch.tensor([self.vocab.bos]), self.ids[s:s + length - 1]]) for s in starts]
        tokens = torch.stack(rows)
        # Everything but BOS may be masked.
        maskable = torch.ones_like(tokens, dtype=torch.bool)
        maskable[:, 0] = False
        return tokens, maskable

    def conversation(self, length):
        """A row of `length` tokens: BOS, then consecutive speeches as alternating user and assistant turns
        from a random speech, and where the first answer starts."""
        enc, v = self.vocab.encoder.encode, self.vocab
        headers = {role: [v.start_header] + enc(role) + [v.end_header] for role in ("user", "assistant")}
        while True:
            if self.sft_echo > 0 and self.rng.random() < self.sft_echo:
                i = self.echo_starts[self.rng.randrange(len(self.echo_starts))]
            else:
                i = self.rng.randrange(len(self.turns) - 1)
            ids = [v.bos] + headers["user"] + self.turns[i] + [v.eot] + headers["assistant"]
            answer_start = len(ids)
            if answer_start + 8 > length:
                continue
            role = "assistant"
            while len(ids) < length and i + 1 < len(self.turns):
                i += 1
                ids += self.turns[i] + [v.eot]
                role = "user" if role == "assistant" else "assistant"
                ids += headers[role]
            if len(ids) >= length:
                return ids[:length], answer_start

    def sft(self, batch):
        if self.sft_packed:
            rows = [self.conversation(self.sft_len) for _ in range(batch)]
            tokens = torch.tensor([ids for ids, _ in rows], dtype=torch.long)
            positions = torch.arange(self.sft_len)[None, :]
            return tokens, positions >= torch.tensor([start for _, start in rows])[:, None]
        picks = [self.chat[self.rng.randrange(len(self.chat))] for _ in range(batch)]
        length = self.sft_len
        if self.sft_fit:
            length = min(self.sft_len, (max(n for _, _, n in picks) + 15) // 16 * 16)
        tokens = torch.tensor([ids[:length] for ids, _, _ in picks], dtype=torch.long)
        # Only the answer (its text, <|eot_id|> and the EOS padding) is masked; the prompt stays visible.
        positions = torch.arange(length)[None, :]
        maskable = positions >= torch.tensor([start for _, start, _ in picks])[:, None]
        return tokens, maskable


def heldout_windows(vocab, heldout_text, seq_len):
    """The held-out split cut into consecutive BOS + (seq_len - 1) token windows (the tail is dropped)."""
    ids = vocab.encoder.encode(heldout_text)
    n = seq_len - 1
    return torch.tensor([[vocab.bos] + ids[i:i + n] for i in range(0, len(ids) - n + 1, n)], dtype=torch.long)
