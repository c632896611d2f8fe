"""Seeded text perturbations for robustness evaluation: how much does the task metric drop on noisy input?

    perturb_records(records, kind, "typos", rate=0.1, seed=13) -> records with perturbed text

Four kinds, each applied to a fraction `rate` of the words of every example:

- `typos`: one character edit per chosen word (swap two neighbours, delete, duplicate, or replace with a
  neighbour on a QWERTY keyboard), words of 3+ letters only;
- `casing`: the chosen words upper-cased, or, for an example drawn with probability `rate`, all of it lower-
  or upper-cased;
- `punctuation`: punctuation marks dropped, and extra spaces around the chosen words;
- `word_dropout`: the chosen words removed (for NER, with their tags, so labels stay aligned).

Every example draws from its own generator, seeded by (seed, kind, index): the same call always gives the
same text, and one example's noise does not depend on the others.
"""

from __future__ import annotations

import random
import string
import zlib

KINDS = ("typos", "casing", "punctuation", "word_dropout")

_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {
    ch: "".join(
        _ROWS[r2][c2]
        for r2 in (r - 1, r, r + 1) if 0 <= r2 < len(_ROWS)
        for c2 in (c - 1, c, c + 1) if 0 <= c2 < len(_ROWS[r2]) and (r2, c2) != (r, c)
    )
    for r, row in enumerate(_ROWS) for c, ch in enumerate(row)
}


def _rng(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{kind}:{index}".encode()))


def _typo(word: str, rng: random.Random) -> str:
    if sum(ch.isalpha() for ch in word) < 3:
        return word
    i = rng.randrange(len(word) - 1)
    edit = rng.choice(("swap", "delete", "duplicate", "keyboard"))
    if edit == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == "delete":
        return word[:i] + word[i + 1:]
    if edit == "duplicate":
        return word[:i] + word[i] + word[i:]
    neighbours = _NEIGHBOURS.get(word[i].lower())
    if not neighbours:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    replacement = rng.choice(neighbours)
    return word[:i] + (replacement.upper() if word[i].isupper() else replacement) + word[i + 1:]


def perturb_words(words: list[str], kind: str, *, rate: float, rng: random.Random) -> list[str]:
    """`words` with a fraction `rate` of them perturbed (for `word_dropout`: without them, keeping at least one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")
    chosen = [rng.random() < rate for _ in words]
    if kind == "typos":
        return [_typo(w, rng) if pick else w for w, pick in zip(words, chosen, strict=True)]
    if kind == "casing":
        whole = rng.random()
        if whole < rate / 2:
            return [w.lower() for w in words]
        if whole < rate:
            return [w.upper() for w in words]
        return [w.upper() if pick else w for w, pick in zip(words, chosen, strict=True)]
    if kind == "punctuation":  # a chosen word loses its punctuation, or (having none) gains spaces
        out = []
        for w, pick in zip(words, chosen, strict=True):
            stripped = w.strip(string.punctuation)
            out.append(w if not pick else stripped if stripped and stripped != w else f" {w} ")
        return out
    return [w for w, pick in zip(words, chosen, strict=True) if not pick] or words[:1]


def _valid_iob2(tags: list[str]) -> list[str]:
    """An I- tag whose entity start was dropped becomes the new start (B-)."""
    out = []
    for tag in tags:
        if tag.startswith("I-") and (not out or out[-1][2:] != tag[2:] or out[-1] == "O"):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def perturb_text(text: str, kind: str, *, rate: float, seed: int, index: int) -> str:
    return " ".join(perturb_words(text.split(" "), kind, rate=rate, rng=_rng(seed, kind, index)))


def perturb_records(records: list[dict], kind: str, *, rate: float, seed: int) -> list[dict]:
    """Copies of labelled records with perturbed input; labels untouched (NER tags follow dropped tokens)."""
    out = []
    for i, record in enumerate(records):
        record = dict(record)
        if "tokens" in record:  # NER: per token, so every tag keeps its token
            rng = _rng(seed, kind, i)
            if kind == "word_dropout":
                keep = [rng.random() >= rate for _ in record["tokens"]]
                if not any(keep):
                    keep[0] = True
                record["tokens"] = [t for t, k in zip(record["tokens"], keep, strict=True) if k]
                record["tags"] = _valid_iob2([t for t, k in zip(record["tags"], keep, strict=True) if k])
            else:
                record["tokens"] = [t.strip() or t for t in perturb_words(record["tokens"], kind, rate=rate, rng=rng)]
        else:
            for field in ("text", "text_pair", "prompt"):
                if isinstance(record.get(field), str):
                    record[field] = perturb_text(record[field], kind, rate=rate, seed=seed,
                                                 index=i * 3 + ("text", "text_pair", "prompt").index(field))
        out.append(record)
    return out
