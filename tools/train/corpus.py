"""The corpus split shared by the tokenizer and model training.

tinyshakespeare is one 1.1 MB file of plays, speeches separated by blank lines. The first 90% (cut at the
first blank line after the 90% byte mark, so no speech is split) trains the tokenizer and the model; the
last 10% is held out for evaluation and never seen in training.
"""

import re

HELDOUT_FRACTION = 0.10


def load_split(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    mark = int(len(text) * (1 - HELDOUT_FRACTION))
    cut = text.index("\n\n", mark) + 2
    return text[:cut], text[cut:]


def words(text):
    """The corpus's notion of a word: a maximal run of ASCII letters, lowercased ("know't" is know + t).
    test/embedded-model.test.ts splits generated text the same way."""
    return re.findall(r"[a-z]+", text.lower())


if __name__ == "__main__":
    # Writes the distinct words of the whole corpus, one per line, sorted:
    #   /usr/bin/python3 tools/train/corpus.py ../shared/data/tinyshakespeare.txt > tools/train/corpus-words.txt
    import sys

    with open(sys.argv[1], encoding="utf-8") as f:
        print("\n".join(sorted(set(words(f.read())))))
