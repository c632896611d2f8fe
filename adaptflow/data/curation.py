"""Corpus curation before continued pretraining: raw documents in, the documents worth training on out.

``curate(texts, config, eval_sets)`` applies the filters of a ``CurateConfig`` in this order, each to what the
previous one kept: strip markup → remove boilerplate lines (a line found verbatim in many documents) → length
and quality rules (Gopher-style ratios, no word lists) → exact duplicates → near duplicates (MinHash LSH over
word shingles; the first document of each cluster stays) → decontamination (a document sharing a word n-gram
with any evaluation text is dropped). It is pure and deterministic: no I/O, the same input and config give
the same output, and kept documents keep their input order. The returned ``CurationResult`` counts what each
filter removed, which evaluation sets the corpus overlapped, and keeps a few removed examples for a report.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from adaptflow.config.base import CorpusName, Fraction, PositiveInt, Section
from adaptflow.data.corpus import PreparedCorpus, SeenDigests, load_texts, write_texts


class NearDuplicatesConfig(Section):
    """Near-duplicate removal: MinHash LSH over word shingles of the normalised text (case and punctuation ignored).
    A document whose estimated Jaccard similarity to an earlier kept one is at least `threshold` is dropped, so
    the first document of each cluster stays."""

    threshold: Annotated[float, Field(gt=0, le=1)] = 0.8  # Jaccard similarity of the shingle sets
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128  # MinHash permutations: more = sharper estimate, slower
    shingle_words: Annotated[int, Field(ge=1, le=32)] = 5  # words per shingle (documents shorter: one shingle)


class DecontaminateConfig(Section):
    """Drop corpus documents that share a word n-gram with an evaluated task text (GPT-3's 13-gram rule), compared
    after NFKC, case-folding and turning punctuation into spaces. The flow passes the texts of every task split the
    recipe evaluates. An evaluation text shorter than `ngram` words must appear whole in a document (and a document
    shorter than `ngram` whole in an evaluation text); texts shorter than `min_ngram` words are not checked: that
    few words cannot tell a leak from a common phrase."""

    enabled: bool = True
    ngram: Annotated[int, Field(ge=1, le=64)] = 13
    min_ngram: Annotated[int, Field(ge=1, le=64)] = 8  # GPT-3 used 8 to 13 words

    @model_validator(mode="after")
    def _min_below_ngram(self) -> DecontaminateConfig:
        if self.min_ngram > self.ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be at most ngram ({self.ngram}); lower min_ngram")
        return self


class CurateConfig(Section):
    """Corpus curation before continued pretraining. Filters run in this order, each on what the previous kept:
    strip markup → drop boilerplate lines → length and quality rules → exact duplicates → near duplicates →
    decontamination against the evaluation sets. The rules are language-agnostic (Gopher-style ratios, no word
    lists; "words" are whitespace-separated). A null value turns its rule off."""

    enabled: bool = True
    corpus: CorpusName = "domain"  # the corpus to curate
    strip_markup: bool = True  # HTML/XML tags, comments, script/style blocks; entities decoded
    # A line found verbatim (whitespace aside) in at least this many multi-line documents, or this fraction of all
    # documents when below 1, is boilerplate (headers, footers, navigation) and is removed from every document.
    boilerplate_min_docs: int | float | None = 10
    min_words: PositiveInt = 20  # documents with fewer words are dropped
    max_words: PositiveInt | None = None
    min_alpha_word_ratio: Fraction | None = 0.8  # Gopher: share of words with at least one letter
    max_digit_ratio: Fraction | None = 0.25  # share of digits among non-space characters (tables, listings)
    max_symbol_word_ratio: Annotated[float, Field(ge=0)] | None = 0.1  # Gopher: '#', '...' and '…' per word
    max_duplicate_line_ratio: Fraction | None = 0.3  # Gopher: share of a document's lines repeating an earlier one
    exact_duplicates: bool = True  # drop later copies of a document (compared after stripping whitespace)
    near_duplicates: NearDuplicatesConfig | None = NearDuplicatesConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()

    @model_validator(mode="after")
    def _consistent(self) -> CurateConfig:
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be at least min_words ({self.min_words})")
        value = self.boilerplate_min_docs
        if value is not None and not (0 < value < 1 or (value >= 2 and float(value).is_integer())):
            raise ValueError(
                f"boilerplate_min_docs must be a whole number of documents (at least 2) or a fraction of the corpus "
                f"between 0 and 1, got {value}; null turns boilerplate removal off"
            )
        return self


_EXAMPLE_CHARS = 300
# Every count `curate` may report, in the order the filters run.
FILTERS = ("markup_stripped", "boilerplate_lines", "too_short", "too_long", "few_alpha_words", "too_many_digits",
           "too_many_symbols", "repeated_lines", "exact_duplicate", "near_duplicate", "contaminated")

# HTML/XML markup. A tag with attributes must have an `=` among them, so "IL-6<IL-10 and TNF>IL-1" or "a<b or c>d"
# in scientific text is not taken for a tag; `<input disabled>` is the (rare) price.
_MARKUP = re.compile(
    r"<!--.*?-->"
    r"|<(?P<raw>script|style)\b[^>]*>.*?</(?P=raw)\s*>"
    r"|<![A-Za-z][^<>]*>|<\?[^<>]*\?>"
    r"|</?(?P<tag>[A-Za-z][\w:.-]*)(?:\s+[^<>]*?=[^<>]*?)?\s*/?>"
    r"|&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]{1,31});",
    re.DOTALL | re.IGNORECASE,
)
# Tags that start a new line when rendered: replaced by a line break so that line-based rules still see lines.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr "
    "li main nav ol p pre section table tbody td tfoot th thead title tr ul".split()
)
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
_LETTER = re.compile(r"[^\W\d_]")  # any script's letters
_DIGIT = re.compile(r"\d")
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class CurationResult:
    """What ``curate`` kept and removed.

    ``texts`` are the kept documents in input order (with markup and boilerplate lines stripped) and
    ``kept_indices`` their positions in the input. ``removed`` maps each filter that ran, in the order applied,
    to a count: ``markup_stripped`` counts documents modified and ``boilerplate_lines`` lines removed; every
    other key counts documents dropped, so ``len(texts) + documents_removed == input_documents``.
    ``contamination`` maps each evaluation set to how many documents (after deduplication) shared an n-gram
    with it (a document may overlap several sets, so these need not sum to ``removed["contaminated"]``);
    ``eval_texts_skipped`` counts per set the texts too short to check. ``examples`` holds up to a few removed
    documents (or lines) per filter, truncated; ``seconds`` the wall time of each step.
    """

    MODIFYING: ClassVar[tuple[str, ...]] = ("markup_stripped", "boilerplate_lines")

    texts: list[str]
    kept_indices: list[int]
    input_documents: int
    removed: dict[str, int]
    contamination: dict[str, int] = field(default_factory=dict)
    eval_texts_skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def documents_removed(self) -> int:
        return sum(n for name, n in self.removed.items() if name not in self.MODIFYING)

    def summary(self) -> dict[str, int]:
        """Flat counts for ``mlflow.log_metrics`` or a CLI table: documents in and kept, per filter, per eval set."""
        out = {"documents_in": self.input_documents, "documents_kept": len(self.texts)}
        out |= {f"removed.{name}": n for name, n in self.removed.items()}
        out |= {f"contaminated_by.{name}": n for name, n in self.contamination.items()}
        return out

    def lines(self) -> list[str]:
        """The summary as aligned human-readable lines, filters in the order applied."""
        rows = [("documents in", self.input_documents)]
        rows += [(name.replace("_", " "), n) for name, n in self.removed.items()]
        rows += [(f"overlapping {name}", n) for name, n in self.contamination.items()]
        rows.append(("documents kept", len(self.texts)))
        width = max(len(label) for label, _ in rows)
        return [f"{label:<{width}}  {n:>9,}" for label, n in rows]


def curate(
    texts: Sequence[str],
    config: CurateConfig,
    eval_sets: Mapping[str, Sequence[str]] | None = None,
    *,
    max_examples: int = 3,
) -> CurationResult:
    """Curate ``texts`` as ``config`` says; ``eval_sets`` maps a name (e.g. ``chemprot/test``) to its texts.

    A disabled config (``enabled: false``) returns the input unchanged. Without evaluation sets, or with
    ``decontaminate.enabled: false``, nothing is checked for contamination.
    """
    docs = list(enumerate(texts))
    log = _Log(max_examples)
    if not config.enabled:
        return log.result(docs, len(docs))

    if config.strip_markup:
        with log.step("strip_markup"):
            docs = _strip_markup(docs, log)
    if config.boilerplate_min_docs is not None:
        with log.step("boilerplate"):
            docs = _strip_boilerplate(docs, config.boilerplate_min_docs, len(texts), log)
    with log.step("rules"):
        docs = _apply_rules(docs, config, log)
    if config.exact_duplicates:
        with log.step("exact_dedupe"):
            docs = _drop_exact_duplicates(docs, log)
    # Near-dedupe and decontamination compare the same normalised words: compute them once.
    words: list[list[str]] = []
    if config.near_duplicates is not None or (config.decontaminate.enabled and eval_sets):
        with log.step("normalise"):
            words = [normalise_words(text) for _, text in docs]
    if config.near_duplicates is not None:
        with log.step("near_dedupe"):
            docs, words = _drop_near_duplicates(docs, words, config.near_duplicates, log)
    if config.decontaminate.enabled and eval_sets:
        with log.step("decontaminate"):
            docs = _decontaminate(docs, words, eval_sets, config.decontaminate, log)
    return log.result(docs, len(texts))


def curate_corpus(
    corpus: PreparedCorpus, config: CurateConfig, eval_sets: Mapping[str, Sequence[str]], *, out_dir: str | Path
) -> tuple[PreparedCorpus, CurationResult]:
    """Curate a prepared corpus's train and validation splits together (a validation document near-duplicating a
    training one goes, so held-out perplexity stays held out), write both kept splits next to the originals and
    return them as a `PreparedCorpus` with the result of `curate`."""
    train, validation = load_texts(corpus.train), load_texts(corpus.validation)
    result = curate([*train, *validation], config, eval_sets)
    kept = dict(zip(result.kept_indices, result.texts, strict=True))
    name = (corpus.train.name or "corpus/train").split("/")[0]
    splits = {
        split: write_texts([kept[i] for i in indices if i in kept], name=name, split=split, out_dir=out_dir)
        for split, indices in (("train", range(len(train))), ("validation", range(len(train), len(train) + len(validation))))
    }
    curated = dataclasses.replace(corpus, train=splits["train"], validation=splits["validation"])
    return curated, result


def normalise_words(text: str) -> list[str]:
    """The words compared by near-duplicate and contamination checks: NFKC, case-folded, punctuation as space."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


class _Log:
    """Counts, examples and timings as the filters run; ``result`` freezes them into a ``CurationResult``."""

    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.removed: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.seconds: dict[str, float] = {}
        self.contamination: dict[str, int] = {}
        self.eval_texts_skipped: dict[str, int] = {}

    def start(self, *names: str) -> None:
        """Register filters that run, so they are reported (with 0) in the order applied."""
        for name in names:
            self.removed.setdefault(name, 0)

    def count(self, name: str, example: str | None = None, n: int = 1) -> None:
        self.removed[name] = self.removed.get(name, 0) + n
        shown = self.examples.setdefault(name, [])
        if example is not None and len(shown) < self.max_examples:
            shown.append(example if len(example) <= _EXAMPLE_CHARS else example[: _EXAMPLE_CHARS - 1] + "…")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start

    def result(self, docs: list[tuple[int, str]], input_documents: int) -> CurationResult:
        return CurationResult(
            texts=[text for _, text in docs],
            kept_indices=[index for index, _ in docs],
            input_documents=input_documents,
            removed=self.removed,
            contamination=self.contamination,
            eval_texts_skipped=self.eval_texts_skipped,
            examples={name: shown for name, shown in self.examples.items() if shown},
            seconds=self.seconds,
        )


def _strip_markup(docs: list[tuple[int, str]], log: _Log) -> list[tuple[int, str]]:
    log.start("markup_stripped")

    def replace(match: re.Match) -> str:
        token = match[0]
        if token.startswith("&"):
            return html.unescape(token)
        tag = match["tag"]
        return "\n" if tag is not None and tag.lower() in _BLOCK_TAGS else ""

    out = []
    for index, text in docs:
        stripped, found = _MARKUP.subn(replace, text)
        if found:
            stripped = "\n".join(line.strip() for line in _SPACES.sub(" ", stripped).split("\n"))
            stripped = _BLANK_LINES.sub("\n", stripped).strip()
            if stripped != text:
                log.count("markup_stripped", text)
                text = stripped
        out.append((index, text))
    return out


def _line_key(line: str) -> str:
    return " ".join(line.split())


def _strip_boilerplate(docs: list[tuple[int, str]], min_docs: float, total: int, log: _Log) -> list[tuple[int, str]]:
    log.start("boilerplate_lines")
    threshold = int(min_docs) if min_docs >= 1 else max(2, math.ceil(min_docs * total))
    # Only multi-line documents vote and lose lines: a one-line document repeated across the corpus is a
    # duplicate document, which exact dedupe handles while keeping its first copy.
    document_counts: Counter[str] = Counter()
    for _, text in docs:
        if "\n" in text:
            document_counts.update({key for key in map(_line_key, text.split("\n")) if key})
    boilerplate = {key for key, n in document_counts.items() if n >= threshold}
    if not boilerplate:
        return docs
    for key in sorted(boilerplate, key=lambda k: (-document_counts[k], k))[: log.max_examples]:
        log.examples.setdefault("boilerplate_lines", []).append(
            f"{key[:_EXAMPLE_CHARS]} (in {document_counts[key]:,} documents)"
        )

    out = []
    for index, text in docs:
        if "\n" in text:
            lines = text.split("\n")
            kept = [line for line in lines if _line_key(line) not in boilerplate]
            if len(kept) < len(lines):
                log.count("boilerplate_lines", n=len(lines) - len(kept))
                text = "\n".join(kept).strip()
        out.append((index, text))
    return out


def _apply_rules(docs: list[tuple[int, str]], config: CurateConfig, log: _Log) -> list[tuple[int, str]]:
    rules = [
        ("too_short", True),
        ("too_long", config.max_words is not None),
        ("few_alpha_words", config.min_alpha_word_ratio is not None),
        ("too_many_digits", config.max_digit_ratio is not None),
        ("too_many_symbols", config.max_symbol_word_ratio is not None),
        ("repeated_lines", config.max_duplicate_line_ratio is not None),
    ]
    log.start(*(name for name, active in rules if active))
    out = []
    for index, text in docs:
        failed = _failed_rule(text, config)
        if failed is None:
            out.append((index, text))
        else:
            log.count(failed, text)
    return out


def _failed_rule(text: str, config: CurateConfig) -> str | None:
    """The first length or quality rule ``text`` fails, or None. Cheap rules first: most documents pass them all."""
    words = text.split()
    n = len(words)
    if n < config.min_words:
        return "too_short"
    if config.max_words is not None and n > config.max_words:
        return "too_long"
    if config.min_alpha_word_ratio is not None:
        alpha = sum(1 for word in words if _LETTER.search(word))
        if alpha < config.min_alpha_word_ratio * n:
            return "few_alpha_words"
    if config.max_digit_ratio is not None:
        characters = sum(map(len, words))
        if len(_DIGIT.findall(text)) > config.max_digit_ratio * characters:
            return "too_many_digits"
    if config.max_symbol_word_ratio is not None:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols > config.max_symbol_word_ratio * n:
            return "too_many_symbols"
    if config.max_duplicate_line_ratio is not None and "\n" in text:
        lines = [key for key in map(_line_key, text.split("\n")) if key]
        if len(lines) - len(set(lines)) > config.max_duplicate_line_ratio * len(lines):
            return "repeated_lines"
    return None


def _drop_exact_duplicates(docs: list[tuple[int, str]], log: _Log) -> list[tuple[int, str]]:
    log.start("exact_duplicate")
    out = []
    for (index, text), new in zip(docs, SeenDigests().new([text for _, text in docs]), strict=True):
        if new:  # the comparison of adaptflow.data.corpus.dedupe_exact (stripped text)
            out.append((index, text))
        else:
            log.count("exact_duplicate", text)
    return out


def _shingles(words: list[str], size: int) -> set[bytes]:
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def _drop_near_duplicates(
    docs: list[tuple[int, str]], words: list[list[str]], config: NearDuplicatesConfig, log: _Log
) -> tuple[list[tuple[int, str]], list[list[str]]]:
    # datasketch imports numpy and scipy: pay for it only when near-dedupe runs.
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    log.start("near_duplicate")
    # LSH only proposes candidates; each is confirmed by its estimated Jaccard below. So favour recall: with the
    # default even weights, 128 permutations at threshold 0.8 find only ~40% of pairs at similarity 0.8 and ~70%
    # at 0.85; with (0.1, 0.9) ~87% and ~97%, for a few more candidates to confirm.
    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=(0.1, 0.9))
    # CRC-32 hashes a shingle ~3x faster than datasketch's default SHA-1 (the sketch's permutations re-mix it).
    sketches = MinHash.generator(
        (_shingles(w, config.shingle_words) for w in words), num_perm=config.num_perm, hashfunc=zlib.crc32
    )
    kept_sketches: dict[int, LeanMinHash] = {}
    out, out_words = [], []
    for (index, text), doc_words, sketch in zip(docs, words, sketches, strict=True):
        if not doc_words:  # nothing to compare (all punctuation): never a near duplicate of anything
            out.append((index, text))
            out_words.append(doc_words)
            continue
        lean = LeanMinHash(sketch)
        if any(lean.jaccard(kept_sketches[key]) >= config.threshold for key in lsh.query(lean)):
            log.count("near_duplicate", text)
            continue
        lsh.insert(index, lean, check_duplication=False)
        kept_sketches[index] = lean
        out.append((index, text))
        out_words.append(doc_words)
    return out, out_words


class _EvalIndex:
    """The n-grams of every evaluation text, built once, matched exactly against each document's words.

    An evaluation text contributes all its ``ngram``-word windows, or itself whole when shorter (down to
    ``min_ngram`` words). Grams are looked up by their first ``min_ngram`` words, so one dictionary probe per
    document position finds every gram that could start there, whatever its length.
    """

    def __init__(self, eval_sets: Mapping[str, Sequence[str]], config: DecontaminateConfig):
        self.names = list(eval_sets)
        self.key_words = config.min_ngram
        self.ngram = config.ngram
        self.skipped = dict.fromkeys(self.names, 0)
        self.eval_words: list[list[list[str]]] = []
        grams: dict[tuple[str, ...], int] = {}  # gram -> bitmask of the sets holding it
        for bit, name in enumerate(self.names):
            set_words = []
            for text in eval_sets[name]:
                words = normalise_words(text)
                if len(words) < config.min_ngram:
                    self.skipped[name] += 1
                    continue
                set_words.append(words)
                for i in range(max(1, len(words) - config.ngram + 1)):
                    gram = tuple(words[i : i + config.ngram])
                    grams[gram] = grams.get(gram, 0) | (1 << bit)
            self.eval_words.append(set_words)
        self.by_key: dict[str, list[tuple[int, str, int]]] = {}
        for gram, mask in grams.items():
            key = " ".join(gram[: self.key_words])
            self.by_key.setdefault(key, []).append((len(gram), " ".join(gram), mask))
        self._haystacks: list[str] | None = None

    def match(self, words: list[str]) -> tuple[int, str]:
        """(bitmask of the sets that ``words`` overlaps, one overlapping passage), or (0, "")."""
        if len(words) < self.key_words:
            return 0, ""
        everything = (1 << len(self.names)) - 1
        mask, passage = 0, ""
        k = self.key_words
        for i in range(len(words) - k + 1):
            candidates = self.by_key.get(" ".join(words[i : i + k]))
            if candidates is None:
                continue
            for length, gram, gram_mask in candidates:
                if gram_mask & ~mask and " ".join(words[i : i + length]) == gram:
                    mask |= gram_mask
                    passage = passage or gram
            if mask == everything:
                return mask, passage
        if len(words) < self.ngram:
            # A short document copied out of a longer evaluation text: look for it whole, on word boundaries.
            needle = f" {' '.join(words)} "
            for bit, haystack in enumerate(self.haystacks()):
                if not mask & (1 << bit) and needle in haystack:
                    mask |= 1 << bit
                    passage = passage or needle.strip()
        return mask, passage

    def haystacks(self) -> list[str]:
        # Built on first use: with the default min_words a corpus rarely has documents this short.
        if self._haystacks is None:
            self._haystacks = [
                "\n".join(f" {' '.join(words)} " for words in set_words) for set_words in self.eval_words
            ]
        return self._haystacks


def _decontaminate(
    docs: list[tuple[int, str]],
    words: list[list[str]],
    eval_sets: Mapping[str, Sequence[str]],
    config: DecontaminateConfig,
    log: _Log,
) -> list[tuple[int, str]]:
    log.start("contaminated")
    index = _EvalIndex(eval_sets, config)
    log.contamination = dict.fromkeys(index.names, 0)
    log.eval_texts_skipped = index.skipped
    out = []
    for (position, text), doc_words in zip(docs, words, strict=True):
        mask, passage = index.match(doc_words)
        if not mask:
            out.append((position, text))
            continue
        hit = [name for bit, name in enumerate(index.names) if mask & (1 << bit)]
        for name in hit:
            log.contamination[name] += 1
        log.count("contaminated", f"[{', '.join(hit)}: “{passage}”] {text}")
    return out
