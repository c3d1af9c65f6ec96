#!/usr/bin/python3
"""Byte-level BPE tokenizer for the embedded Shakespeare model.

Trains merges on the training split of tinyshakespeare and writes the tokenizer in the Hugging Face
`tokenizer.json` format (BPE model + ByteLevel pre-tokenizer/decoder + added special tokens), plus a
`tokenizer_config.json` carrying the special token names and an LLaDA-Instruct-style chat template.
The same file is read by @huggingface/tokenizers in the server and by `Encoder` below in training.

    /usr/bin/python3 tools/train/bpe.py --corpus ../shared/data/tinyshakespeare.txt --out DIR

Standard library only.
"""
import argparse
import collections
import json
import os
import re

from corpus import load_split

# The GPT-2 pre-tokenizer pattern that the ByteLevel pre-tokenizer applies. Python's `re` has no \p{L}/\p{N};
# [^\W\d_] is "a letter" and \d "a digit", which coincide with \p{L}/\p{N} on this (ASCII) corpus.
# Training data is encoded here and the server encodes with @huggingface/tokenizers; test_roundtrip.mjs
# checks the two agree token for token on the whole corpus.
_LETTERS = r"[^\W\d_]"
PRETOKEN_PATTERN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d"
    rf"| ?{_LETTERS}+| ?\d+| ?[^\s\w]+| ?_+"  # `_` is \w in Python but punctuation for \p{{L}}\p{{N}}
    r"|\s+(?!\S)|\s+"
)

# LLaDA-style special tokens, in the order they get ids after the merged vocabulary. Padding uses EOS,
# as LLaDA does.
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]

# Same shape as LLaDA-8B-Instruct's template: BOS, then per message a header with the role, a blank line,
# the content and <|eot_id|>; the generation prompt opens an assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_TO_CHAR = bytes_to_unicode()


def pretokens(text):
    return PRETOKEN_PATTERN.findall(text)


def train_merges(text, num_merges):
    """Classic BPE: repeatedly merge the most frequent adjacent pair, counted over distinct pre-tokens.

    Pair counts and a pair → words index are updated incrementally, so each merge only touches the words
    that contain it. Ties break on the pair itself so the result does not depend on dict order.
    """
    word_counts = collections.Counter(pretokens(text))
    words = [[BYTE_TO_CHAR[b] for b in w.encode("utf-8")] for w in word_counts]
    counts = list(word_counts.values())

    pair_counts = collections.Counter()
    pair_words = collections.defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[i]
            pair_words[pair].add(i)

    merges = []
    for _ in range(num_merges):
        if not pair_counts:
            break
        best = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if pair_counts[best] < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        for i in list(pair_words[best]):
            symbols = words[i]
            # Remove this word's old pairs, merge, then add its new pairs back.
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= counts[i]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                pair_words[pair].discard(i)
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += counts[i]
                pair_words[pair].add(i)
        pair_words.pop(best, None)
    return merges


def build_tokenizer_json(merges):
    vocab = {}
    for b in range(256):
        vocab[BYTE_TO_CHAR[b]] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = [
        {"id": len(vocab) + k, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for k, tok in enumerate(SPECIAL_TOKENS)
    ]
    bos_id = added[0]["id"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        # Like LLaMA-3 style tokenizers: encoding "with special tokens" prepends BOS. A rendered chat template
        # already starts with BOS, so chat prompts are encoded without special tokens.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b in merges],
        },
    }


def build_tokenizer_config():
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "additional_special_tokens": [START_HEADER, END_HEADER, EOT],
        "add_bos_token": True,
        "add_eos_token": False,
        # Byte-level BPE is lossless; the HF "clean up" pass would rewrite " ," to "," and break round trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }


class Encoder:
    """Encodes text with a tokenizer.json written by this script (ordinary text; no special tokens)."""

    def __init__(self, tokenizer_json):
        model = tokenizer_json["model"]
        self.vocab = model["vocab"]
        self.ranks = {tuple(m): r for r, m in enumerate(model["merges"])}
        self.special = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
        self.cache = {}

    def _bpe(self, word):
        symbols = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(self.ranks.get(p, 1 << 30), k) for k, p in enumerate(zip(symbols, symbols[1:]))]
            rank, k = min(ranked)
            if rank == 1 << 30:
                break
            pair = (symbols[k], symbols[k + 1])
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                    out.append(pair[0] + pair[1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            symbols = out
        return [self.vocab[s] for s in symbols]

    def encode(self, text):
        ids = []
        for word in pretokens(text):
            if word not in self.cache:
                self.cache[word] = self._bpe(word)
            ids.extend(self.cache[word])
        return ids

    def decode(self, ids):
        char_to_byte = {c: b for b, c in BYTE_TO_CHAR.items()}
        id_to_token = {i: t for t, i in self.vocab.items()}
        id_to_special = {i: t for t, i in self.special.items()}
        out = bytearray()
        for i in ids:
            if i in id_to_special:
                out += id_to_special[i].encode("utf-8")
            else:
                out += bytes(char_to_byte[c] for c in id_to_token[i])
        return out.decode("utf-8", errors="replace")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=2048, help="total, including the special tokens")
    parser.add_argument("--write-corpus-ids", metavar="PATH",
                        help="also write the ids of the whole corpus as JSON, for check_tokenizer.mjs")
    args = parser.parse_args()

    train_text, heldout_text = load_split(args.corpus)
    num_merges = args.vocab_size - 256 - len(SPECIAL_TOKENS)
    merges = train_merges(train_text, num_merges)
    if len(merges) != num_merges:
        raise SystemExit(f"only {len(merges)} merges found, wanted {num_merges}")
    tokenizer_json = build_tokenizer_json(merges)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(build_tokenizer_config(), f, ensure_ascii=False, indent=2)

    enc = Encoder(tokenizer_json)
    for name, text in (("train", train_text), ("heldout", heldout_text)):
        ids = enc.encode(text)
        assert enc.decode(ids) == text, f"{name} split does not round-trip"
        print(f"{name}: {len(text)} bytes -> {len(ids)} tokens ({len(text) / len(ids):.2f} bytes/token)")
    print(f"vocab size {args.vocab_size} ({len(merges)} merges, {len(SPECIAL_TOKENS)} special tokens)")
    if args.write_corpus_ids:
        with open(args.write_corpus_ids, "w") as f:
            json.dump(enc.encode(train_text + heldout_text), f)


if __name__ == "__main__":
    main()
