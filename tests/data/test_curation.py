"""Corpus curation: each filter removes what it should and nothing else, on synthetic and on real data."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from adaptflow.data.corpus import read_texts
from adaptflow.data.curation import CurateConfig, CurationResult, curate, normalise_words
from tests.conftest import DATA_ROOT

ABSTRACTS = DATA_ROOT / "biomedical/unlabelled_ncbi_abstracts/abstracts.txt"
CHEMPROT_TEST = DATA_ROOT / "biomedical/chemprot/test.jsonl"

# Only the filter under test runs, unless a test turns others on.
NOTHING = {
    "strip_markup": False,
    "boilerplate_min_docs": None,
    "min_words": 1,
    "min_alpha_word_ratio": None,
    "max_digit_ratio": None,
    "max_symbol_word_ratio": None,
    "max_duplicate_line_ratio": None,
    "exact_duplicates": False,
    "near_duplicates": None,
    "decontaminate": {"enabled": False},
}


def only(**keys) -> CurateConfig:
    return CurateConfig(**(NOTHING | keys))


def prose(seed: int, words: int = 120) -> str:
    """Letters-only pseudo-words: unrelated seeds share (almost) no 5-word shingle."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(words))


def jaccard(a: str, b: str, size: int = 5) -> float:
    def shingles(text):
        w = normalise_words(text)
        return {tuple(w[i : i + size]) for i in range(len(w) - size + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def replace_words(text: str, positions: list[int], seed: int) -> str:
    words = text.split()
    for p in positions:
        words[p] = prose(seed + p, 1)
    return " ".join(words)


def assert_consistent(result: CurationResult, inputs: list[str]) -> None:
    assert len(result.texts) + result.documents_removed == len(inputs) == result.input_documents
    assert result.kept_indices == sorted(result.kept_indices)


def test_markup_is_stripped_and_angle_brackets_in_prose_are_not_tags():
    html = (
        '<html><head><style>p {color: red}</style></head><body><!-- nav --><p class="x">Kinase <b>activity</b> '
        "rose &amp; fell</p><script>var x = 1;</script><br/>second&nbsp;line</body></html>"
    )
    science = "Levels were ranked IL-6<IL-10 and TNF>IL-1 in all 12 samples; p<0.05 & n>3 throughout."
    result = curate([html, science, "plain text"], only(strip_markup=True))

    assert result.texts[0] == "Kinase activity rose & fell\nsecond line"
    assert result.texts[1:] == [science, "plain text"]
    assert result.removed == {"markup_stripped": 1, "too_short": 0}
    assert result.examples["markup_stripped"] == [html]


def test_boilerplate_lines_repeated_across_documents_are_stripped_and_unique_lines_kept():
    footer = "Copyright  2024 Example Journal. All rights reserved."
    docs = [f"Unique body {i} about topic {i}.\n{footer}\nSecond unique line {i}." for i in range(3)]
    docs.append("Copyright 2024 Example Journal. All rights reserved.\nA fourth body.")  # differs only in spacing
    docs.append("A single-line document repeated three times.")
    docs += [docs[-1]] * 2
    result = curate(docs, only(boilerplate_min_docs=4))

    assert result.texts[:4] == [
        "Unique body 0 about topic 0.\nSecond unique line 0.",
        "Unique body 1 about topic 1.\nSecond unique line 1.",
        "Unique body 2 about topic 2.\nSecond unique line 2.",
        "A fourth body.",
    ]
    assert result.texts[4:] == docs[4:]  # one-line documents are duplicates, not boilerplate
    assert result.removed["boilerplate_lines"] == 4
    assert result.examples["boilerplate_lines"] == [
        "Copyright 2024 Example Journal. All rights reserved. (in 4 documents)"
    ]

    # Below the threshold nothing is boilerplate; a fraction of the corpus works too (0.5 of 7 docs -> 4).
    assert curate(docs, only(boilerplate_min_docs=5)).texts == docs
    assert curate(docs, only(boilerplate_min_docs=0.5)).removed["boilerplate_lines"] == 4


def test_length_and_quality_rules_drop_each_document_under_the_first_rule_it_fails():
    good = prose(1, 30)
    docs = {
        "good": good,
        "too_short": "only five words in here",
        "too_long": prose(2, 60),
        "few_alpha_words": " ".join(["12.5 (n = 40) 0.3 ;"] * 4) + " " + prose(3, 10),
        "too_many_digits": " ".join(f"a{n:08d}" for n in range(30)),
        "too_many_symbols": " ".join(f"{w}#" for w in prose(4, 20).split()),
        "repeated_lines": "\n".join([prose(5, 10)] * 3 + [prose(6, 10)]),
    }
    config = only(
        min_words=20,
        max_words=50,
        min_alpha_word_ratio=0.8,
        max_digit_ratio=0.25,
        max_symbol_word_ratio=0.1,
        max_duplicate_line_ratio=0.3,
    )
    result = curate(list(docs.values()), config)

    assert result.texts == [good]
    expected = {name: 1 for name in docs if name != "good"}
    assert result.removed == expected
    for name, text in docs.items():
        if name != "good":
            [shown] = result.examples[name]
            assert text.startswith(shown.removesuffix("…")), name
    assert_consistent(result, list(docs.values()))


def test_exact_duplicates_keep_the_first_copy():
    a, b = prose(1, 30), prose(2, 30)
    result = curate([a, b, f"  {a}\n", b, a], only(exact_duplicates=True))
    assert result.texts == [a, b]
    assert result.kept_indices == [0, 1]
    assert result.removed == {"too_short": 0, "exact_duplicate": 3}


def test_near_duplicates_are_removed_and_different_texts_kept():
    original = prose(10, 300)
    near = replace_words(original, [20, 120, 220], seed=99)  # 3 words of 300 changed
    near = near.upper().replace(" ", ", ", 5)  # case and punctuation do not hide a copy
    other = prose(11, 300)
    assert jaccard(original, near) > 0.85 and jaccard(original, other) < 0.05

    result = curate([original, other, near], only(near_duplicates={}))
    assert result.texts == [original, other]
    assert result.removed["near_duplicate"] == 1
    assert result.examples["near_duplicate"] == [near[:299] + "…"]


def test_near_duplicate_threshold_is_respected():
    original = prose(20, 200)
    # Every 10th word changed: about half of the 5-word shingles differ.
    edited = replace_words(original, list(range(5, 200, 10)), seed=7)
    similarity = jaccard(original, edited)
    assert 0.3 < similarity < 0.45

    assert curate([original, edited], only(near_duplicates={"threshold": 0.8})).texts == [original, edited]
    assert curate([original, edited], only(near_duplicates={"threshold": 0.6})).texts == [original, edited]
    assert curate([original, edited], only(near_duplicates={"threshold": 0.2})).texts == [original]


EVAL_SENTENCE = (
    "The << kinase >> inhibitor blocked [[ receptor ]] phosphorylation in cultured hepatocytes after two hours of "
    "continuous exposure at low micromolar doses."
)


def test_contamination_found_by_a_13_gram_despite_case_and_punctuation():
    eval_words = normalise_words(EVAL_SENTENCE)
    copied_13 = " ".join(eval_words[3:16]).upper().replace(" ", "; ", 2)
    copied_12 = " ".join(eval_words[3:15])
    short_eval = "Aspirin lowered platelet aggregation in every treated volunteer"  # 8 words: matched whole
    too_short_eval = "Binding was weak"  # under min_ngram: not checked
    docs = [
        f"{prose(1, 20)} {copied_13} {prose(2, 20)}",
        f"{prose(3, 20)} {copied_12} {prose(4, 20)}",
        f"{prose(5, 20)} aspirin, lowered platelet aggregation in every treated volunteer! {prose(6, 5)}",
        f"{prose(7, 20)} binding was weak {prose(8, 20)}",
    ]
    eval_sets = {"chemprot/test": [EVAL_SENTENCE, too_short_eval], "other/test": [short_eval]}
    result = curate(docs, only(decontaminate={}), eval_sets)

    assert result.texts == [docs[1], docs[3]]
    assert result.removed["contaminated"] == 2
    assert result.contamination == {"chemprot/test": 1, "other/test": 1}
    assert result.eval_texts_skipped == {"chemprot/test": 1, "other/test": 0}
    assert result.examples["contaminated"][0].startswith(f"[chemprot/test: “{' '.join(eval_words[3:16])}”]")
    assert_consistent(result, docs)


def test_contamination_counts_every_eval_set_a_document_overlaps_and_short_documents_inside_eval_text():
    doc = f"{EVAL_SENTENCE} {prose(1, 10)}"
    inside = " ".join(normalise_words(EVAL_SENTENCE)[2:12])  # a 10-word document copied out of an eval text
    eval_sets = {"a": [EVAL_SENTENCE], "b": [f"{prose(2, 5)} {EVAL_SENTENCE}"], "c": [prose(3, 30)]}
    result = curate([doc, inside], only(decontaminate={}), eval_sets)
    assert result.texts == []
    assert result.contamination == {"a": 2, "b": 2, "c": 0}

    disabled = curate([doc, inside], only(decontaminate={"enabled": False}), eval_sets)
    assert disabled.texts == [doc, inside] and disabled.contamination == {}


def test_filters_run_in_order_and_counts_add_up():
    base = [prose(i, 100) for i in range(8)]
    docs = [
        *base,
        f"<div>{base[0]}</div>",  # markup → then an exact duplicate of base[0]
        replace_words(base[1], [10], seed=3),  # near duplicate of base[1]
        "tiny",  # too short
        f"{prose(50, 20)} {EVAL_SENTENCE}",  # contaminated
    ]
    result = curate(docs, CurateConfig(min_words=20), {"chemprot/test": [EVAL_SENTENCE]})

    assert result.texts == base and result.kept_indices == list(range(8))
    assert list(result.removed) == [
        "markup_stripped",
        "boilerplate_lines",
        "too_short",
        "few_alpha_words",
        "too_many_digits",
        "too_many_symbols",
        "repeated_lines",
        "exact_duplicate",
        "near_duplicate",
        "contaminated",
    ]
    assert {k: v for k, v in result.removed.items() if v} == {
        "markup_stripped": 1,
        "too_short": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "contaminated": 1,
    }
    assert_consistent(result, docs)
    summary = result.summary()
    assert summary["documents_in"] == 12 and summary["documents_kept"] == 8
    assert summary["removed.near_duplicate"] == 1 and summary["contaminated_by.chemprot/test"] == 1
    assert result.lines()[-1].split() == ["documents", "kept", "8"]
    assert set(result.seconds) == {
        "strip_markup",
        "boilerplate",
        "rules",
        "exact_dedupe",
        "normalise",
        "near_dedupe",
        "decontaminate",
    }


def test_disabled_curation_passes_everything_through():
    docs = ["x", "x", "<p>y</p>"]
    result = curate(docs, CurateConfig(enabled=False), {"e": ["x"]})
    assert result.texts == docs and result.removed == {} and result.documents_removed == 0


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"min_words": 0}, "min_words"),
        ({"max_digit_ratio": 1.5}, "max_digit_ratio"),
        ({"min_words": 50, "max_words": 10}, "max_words (10) must be at least min_words (50)"),
        ({"boilerplate_min_docs": 1.5}, "boilerplate_min_docs must be a whole number"),
        ({"boilerplate_min_docs": 1}, "boilerplate_min_docs must be a whole number"),
        ({"near_duplicates": {"threshold": 1.2}}, "near_duplicates.threshold"),
        ({"near_duplicates": {"num_perm": 4}}, "near_duplicates.num_perm"),
        ({"near_duplicates": {"shingle": 5}}, "near_duplicates.shingle"),
        ({"decontaminate": {"ngram": 5, "min_ngram": 8}}, "min_ngram (8) must be at most ngram (5)"),
        ({"typo_key": 1}, "typo_key"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(keys, expected):
    with pytest.raises(ValidationError) as err:
        CurateConfig(**keys)
    assert expected in str(err.value)


def test_real_ncbi_abstracts_against_chemprot_test():
    corpus = read_texts(ABSTRACTS)
    chemprot_test = read_texts(CHEMPROT_TEST)
    eval_sets = {"chemprot/test": chemprot_test}
    result = curate(corpus, CurateConfig(), eval_sets)

    # What the real data holds: no markup, no multi-line documents, no duplicates and no 13-gram shared with
    # ChemProt test; one statistics-heavy abstract ("(P = 6. 64, ...") fails Gopher's 80%-alphabetic-words rule.
    assert_consistent(result, corpus)
    assert result.removed == {
        "markup_stripped": 0,
        "boilerplate_lines": 0,
        "too_short": 0,
        "few_alpha_words": 1,
        "too_many_digits": 0,
        "too_many_symbols": 0,
        "repeated_lines": 0,
        "exact_duplicate": 0,
        "near_duplicate": 0,
        "contaminated": 0,
    }
    assert result.contamination == {"chemprot/test": 0}
    assert result.eval_texts_skipped == {"chemprot/test": 1}  # one ChemProt test text has under 8 words

    # Plant a ChemProt test sentence (entity markers and all) in one abstract, and a lightly edited copy of another.
    planted = next(text for text in chemprot_test if len(text.split()) > 25)
    near = replace_words(corpus[6], [10, 150], seed=1)  # 2 words of 250+ changed
    altered = list(corpus)
    altered[300] = f"{corpus[300]} {planted}"
    altered.append(near)
    result = curate(altered, CurateConfig(), eval_sets)

    assert_consistent(result, altered)
    assert result.removed["contaminated"] == 1 and result.contamination == {"chemprot/test": 1}
    assert result.removed["near_duplicate"] == 1
    assert 300 not in result.kept_indices and len(altered) - 1 not in result.kept_indices
    assert len(result.texts) == len(corpus) - 2
