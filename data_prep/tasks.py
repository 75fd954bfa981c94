"""`pretrain prep tasks`: two probe tasks made from held-out plain text, in the ICL JSONL
format `pretrain.evals` reads. Public benchmarks (HellaSwag, ARC, LAMBADA) measure what a
small model on a small corpus cannot know yet; these measure what it learns first from the
text it trains on, so a team sees them move within the first hundred steps:

- word_order.jsonl (multiple choice): a line or two of a passage, then which line follows:
  the true next line, or one of three shuffles of its words after the first. The choices
  share their words, their length and their tokens (sentencepiece splits at spaces, and
  the first word, the one after the newline, stays), so only word order tells them apart:
  an untrained model is at chance, 1/4. (Shuffling the first word too let an untrained
  model score 53%: a capitalised line start tokenizes differently.) Score it with
  continuation_delimiter "\n" (the answer starts a new line).
- cloze.jsonl (language modelling): a passage cut before a word, one of the inputs' 100
  most frequent; the greedy continuation must be exactly that word (LAMBADA's form on
  common words). Score it with the default continuation_delimiter " ".

Examples are drawn with a seeded generator from the files' non-blank lines: the same
inputs, count and seed give the same files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from data_prep.inputs import InputFile, iter_documents

CHOICES = 4
COMMON_WORDS = 100


def lines_of(item: InputFile, text_field: str) -> list[str]:
    return [ln.strip() for doc in iter_documents(item, text_field) for ln in doc.splitlines() if ln.strip()]  # fmt: skip


def make_tasks(
    inputs: list[InputFile],
    out: Path,
    examples: int,
    seed: int = 0,
    context_lines: int = 2,
    text_field: str = "text",
) -> dict[str, int]:
    """Write word_order.jsonl and cloze.jsonl under `out`; {file name: examples}."""
    texts = [lines for lines in (lines_of(i, text_field) for i in inputs) if len(lines) > context_lines]  # fmt: skip
    if not texts:
        raise ValueError(f"no input has more than {context_lines} non-blank lines")
    counts = Counter(w for lines in texts for line in lines for w in line.split())
    common = {w for w, _ in counts.most_common(COMMON_WORDS) if w.isalpha()}
    rng = random.Random(seed)
    word_order, cloze = [], []
    for _ in range(examples * 1000):
        if len(word_order) == examples:
            break
        lines = rng.choice(texts)
        i = rng.randrange(context_lines, len(lines))
        words = lines[i].split()  # the first stays first: see the docstring
        drawn = (" ".join(words[:1] + rng.sample(words[1:], len(words) - 1)) for _ in range(12))
        shuffles = list(dict.fromkeys(drawn))
        shuffles = [x for x in shuffles if x != " ".join(words)][: CHOICES - 1]
        if len(words) < 4 or len(shuffles) < CHOICES - 1:
            continue
        gold = rng.randrange(CHOICES)
        shuffles.insert(gold, " ".join(words))
        query = "\n".join(lines[i - context_lines : i])
        word_order.append({"query": query, "choices": shuffles, "gold": gold})
    for _ in range(examples * 1000):
        if len(cloze) == examples:
            break
        lines = rng.choice(texts)
        i = rng.randrange(context_lines, len(lines))
        words = lines[i].split()
        at = [k for k, w in enumerate(words) if k and w in common]
        if not at:
            continue
        k = rng.choice(at)
        context = "\n".join([*lines[i - context_lines : i], " ".join(words[:k])])
        cloze.append({"context": context, "continuation": words[k]})
    if len(word_order) < examples or len(cloze) < examples:
        raise ValueError(f"too little text for {examples} examples per task")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in (("word_order.jsonl", word_order), ("cloze.jsonl", cloze)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        written[name] = len(rows)
    return written
