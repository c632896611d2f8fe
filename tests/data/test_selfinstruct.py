"""Self-Instruct: each filter on hand-made strings, then the whole loop on a tiny GPT-2 taught the prompt format.

The tiny model writes nonsense; what is checked is the loop (counts, caps, determinism), that the filters hold
for every kept row, the provenance, and that the written split feeds the SFT objective.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from adaptflow.data.labelled import load_records
from adaptflow.data.selfinstruct import (
    REASONS,
    SCHEMA,
    RougeIndex,
    SelfInstructConfig,
    SelfInstructResult,
    forbidden_keyword,
    generate_instructions,
    instruction_prompt,
    instruction_rejection,
    response_rejection,
    rouge_tokens,
    write_instructions,
)
from adaptflow.errors import DataError
from adaptflow.kinds.sft import DEFAULT_PROMPT_TEMPLATE as DEFAULT_TEMPLATE
from adaptflow.kinds.sft import InstructionSFT, encode_sft
from tests.conftest import build_tiny

SEEDS = [
    {"prompt": "List three symptoms of type 2 diabetes.", "response": "Thirst, frequent urination and fatigue."},
    {"prompt": "Explain what a randomized controlled trial is.", "response": "A study that assigns groups at random."},
    {"prompt": "Summarize the role of insulin in the body.", "response": "It lets cells take up blood glucose."},
    {"prompt": "Name the gene most often mutated in cystic fibrosis.", "response": "The CFTR gene."},
    {"prompt": "Describe how vaccines train the immune system.", "response": "They show it a harmless antigen."},
    {"prompt": "Give two side effects of statin therapy.", "response": "Muscle pain and raised liver enzymes."},
    {"prompt": "Define the term incidence in epidemiology.", "response": "The rate of new cases over time."},
    {"prompt": "Translate the abbreviation MRI into plain words.", "response": "Magnetic resonance imaging."},
    {"prompt": "Classify hypertension as acute or chronic.", "response": "Chronic."},
    {"prompt": "Suggest a question to ask a patient about chest pain.", "response": "When did the pain start?"},
]


def config(**overrides) -> SelfInstructConfig:
    settings = dict(
        seed_task="seeds",
        target_size=8,
        max_attempts=320,
        batch_size=16,
        max_new_tokens=40,
        response_max_new_tokens=40,
        temperature=1.0,
        top_p=0.95,
        response_examples=1,
    )
    return SelfInstructConfig(**settings | overrides)


def reference_rouge_l(a: str, b: str) -> float:
    """rouge_score's own ROUGE-L F1 on a plain pair (no index, no pruning)."""
    from rouge_score import rouge_scorer

    class Tokens:
        def tokenize(self, text):
            return rouge_tokens(text)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tokens()).score(a, b)["rougeL"].fmeasure


# --- filters on hand-made strings ---------------------------------------------------------------------------


def test_rouge_tokens_are_rouge_scores_tokens_on_ascii_and_keep_other_letters():
    from rouge_score.tokenizers import DefaultTokenizer

    for text in ["Write a haiku about the CFTR gene!", "Q&A: list 3 side-effects (statins)", "snake_case x2"]:
        assert rouge_tokens(text) == DefaultTokenizer().tokenize(text)
    assert rouge_tokens("Erkläre die Übertragung") == ["erkläre", "die", "übertragung"]


def test_rouge_index_finds_the_exact_maximum_that_a_plain_scan_finds():
    rng = random.Random(0)
    words = "the a of gene cell list explain protein patient dose trial give name two describe risk".split()
    pool = [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(300)]
    index = RougeIndex()
    for i, text in enumerate(pool):
        index.add(f"p{i}", text)
    for _ in range(30):
        query = " ".join(rng.choices(words, k=rng.randint(4, 12)))
        scores = [reference_rouge_l(text, query) for text in pool]
        best, nearest = index.nearest(query)
        assert best == pytest.approx(max(scores))
        assert scores[int(nearest[1:])] == pytest.approx(best)
        early, _ = index.nearest(query, stop_at=0.3)
        assert early <= best and (early >= 0.3 or early == best)
    assert index.nearest("nothing shared at all") == (0.0, "")


def test_forbidden_keywords_match_whole_words_and_phrases_case_insensitively():
    keywords = config().forbidden_keywords
    assert forbidden_keyword("Draw the structure of insulin.", keywords) == "draw"
    assert forbidden_keyword("Describe the IMAGE below.", keywords) == "image"
    assert forbidden_keyword("Go  to the clinic and ask.", keywords) == "go to"
    assert forbidden_keyword("Explain gene mapping in drawings.", keywords) is None  # not whole words
    assert forbidden_keyword("Explain why cargo tolls rose.", keywords) is None  # "go to" across words
    assert forbidden_keyword("Write a program to sort a list", ["write a program"]) == "write a program"


def test_instruction_filters_name_the_first_failure():
    c = config(min_words=4, max_words=8)
    assert instruction_rejection("   ", c) == "empty"
    assert instruction_rejection("- List three drugs for gout.", c) == "format"
    assert instruction_rejection("List drugs.", c) == "too_short"
    assert instruction_rejection("List every drug that was approved for gout since 1990.", c) == "too_long"
    assert instruction_rejection("Plot the incidence of measles.", c) == "forbidden"
    assert instruction_rejection("List three drugs for gout.", c) is None
    assert instruction_rejection("Ähnliche Studien kurz zusammenfassen bitte.", c) is None  # any letter starts


def test_response_filters():
    c = config(max_response_words=5)
    assert response_rejection("  \n", "List drugs for gout.", c) == "response_empty"
    assert response_rejection("one two three four five six", "List drugs for gout.", c) == "response_too_long"
    assert response_rejection("list drugs for gout", "List drugs for gout.", c) == "response_echo"
    assert response_rejection("Colchicine.", "List drugs for gout.", c) is None


def test_generation_prompt_numbers_tasks_and_leaves_the_next_one_open():
    prompt = instruction_prompt("Come up with a series of tasks:", ["Name a gene.", "Define\n  incidence."])
    assert prompt == "Come up with a series of tasks:\nTask 1: Name a gene.\nTask 2: Define incidence.\nTask 3:"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_attempts": 4}, "max_attempts"),
        ({"min_words": 9, "max_words": 8}, "min_words"),
        ({"seed_examples": 0, "generated_examples": 0}, "seed_examples"),
        ({"forbidden_keywords": ["map", " "]}, "forbidden_keywords"),
        ({"max_rouge_l": 1.5}, "max_rouge_l"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_config_rejects_inconsistent_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


# --- the loop on a tiny decoder --------------------------------------------------------------------------------


def teach_tiny_gpt2():
    """A tiny GPT-2 through the production builders, trained briefly on the two prompt formats, so that it
    writes lines and answers that end (an untrained one almost never emits a newline or eos)."""
    model, tokenizer = build_tiny(
        "gpt2", [f"{s['prompt']} {s['response']}" for s in SEEDS] * 3, max_position_embeddings=256, vocab_size=400
    )
    rng = random.Random(0)
    prompts = [s["prompt"] for s in SEEDS]
    docs = []
    for _ in range(64):
        shown = rng.sample(prompts, 6)
        docs.append(f"{instruction_prompt(config().header, shown[:5])} {shown[5]}\n")
    docs += [DEFAULT_TEMPLATE.format(prompt=s["prompt"]) + s["response"] + tokenizer.eos_token for s in SEEDS]
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(0)  # dropout draws from the global generator
        for _ in range(200):
            batch = [encoded[i] for i in torch.randint(len(encoded), (8,), generator=generator).tolist()]
            width = max(map(len, batch))
            ids = torch.full((8, width), tokenizer.pad_token_id)
            labels = torch.full((8, width), -100)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = labels[row, : len(tokens)] = torch.tensor(tokens)
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])  # it learned the formats
    return model, tokenizer


@pytest.fixture(scope="module")
def taught_gpt2():
    # One torch thread: on these 2 shared cores two threads made this module 14 times slower under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield teach_tiny_gpt2()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generated(taught_gpt2) -> SelfInstructResult:
    model, tokenizer = taught_gpt2
    model.train()
    # A strict ROUGE-L threshold, so that the similarity filter has work to do on these short instructions.
    result = generate_instructions(model, tokenizer, SEEDS, config(max_rouge_l=0.4), seed=0, model_digest="abc123")
    assert model.training  # put back as it was
    return result


def test_kept_rows_carry_their_provenance(generated):
    assert generated.stopped == "target_size" and len(generated.rows) == 8
    assert generated.seeds == len(SEEDS)
    known = {f"seed-{i}" for i in range(len(SEEDS))}
    for number, row in enumerate(generated.rows, 1):
        assert set(row) == set(SCHEMA.names)
        assert row["id"] == f"gen-{number:06d}" and row["generator"] == "abc123"
        assert 1 <= row["round"] <= generated.rounds
        # Shown: at most 8 (6 seeds, up to 2 generated; fewer where a long one left no room in the context),
        # every one known before this row was written.
        assert 1 <= len(row["shown_ids"]) <= 8 and set(row["shown_ids"]) <= known
        assert sum(i.startswith("gen-") for i in row["shown_ids"]) <= 2
        assert len(row["response_shown_ids"]) == 1 and row["response_shown_ids"][0].startswith("seed-")
        assert json.loads(row["sampling"]) == {
            "temperature": 1.0,
            "top_p": 0.95,
            "max_new_tokens": 40,
            "response_max_new_tokens": 40,
            "seed": 0,
        }
        assert row["prompt"].strip() and row["response"].strip()
        known.add(row["id"])
    assert any(any(i.startswith("gen-") for i in row["shown_ids"]) for row in generated.rows)


def test_every_candidate_is_counted_once(generated):
    assert set(generated.rejected) == set(REASONS)
    assert generated.attempts == len(generated.rows) + sum(generated.rejected.values())
    assert generated.attempts <= generated.rounds * 16
    assert generated.rejected["similar"] > 0  # the filter was exercised, not just passed


def test_no_kept_instruction_is_similar_to_a_seed_or_another(generated):
    earlier = [s["prompt"] for s in SEEDS]
    ids = [f"seed-{i}" for i in range(len(SEEDS))]
    for row in generated.rows:
        scores = [reference_rouge_l(text, row["prompt"]) for text in earlier]
        assert max(scores) < 0.4
        assert row["rouge_l_max"] == pytest.approx(max(scores))  # against everything before it, exactly
        assert scores[ids.index(row["nearest_id"])] == pytest.approx(max(scores))
        assert instruction_rejection(row["prompt"], config()) is None
        earlier.append(row["prompt"])
        ids.append(row["id"])
    assert len({tuple(rouge_tokens(text)) for text in earlier}) == len(earlier)


def test_same_seed_same_rows_other_seed_other_rows(taught_gpt2, generated):
    model, tokenizer = taught_gpt2
    again = generate_instructions(model, tokenizer, SEEDS, config(max_rouge_l=0.4), seed=0, model_digest="abc123")
    assert again == generated
    other = generate_instructions(model, tokenizer, SEEDS, config(max_rouge_l=0.4), seed=1, model_digest="abc123")
    assert [r["prompt"] for r in other.rows] != [r["prompt"] for r in generated.rows]


def test_forbidden_keywords_are_rejected(taught_gpt2):
    model, tokenizer = taught_gpt2
    # Words the model picked up from the seeds, so that its candidates do contain them.
    words = ["pain", "gene", "diabetes", "insulin", "trial", "the"]
    result = generate_instructions(
        model, tokenizer, SEEDS, config(forbidden_keywords=words, max_attempts=32), seed=0, model_digest="abc123"
    )
    assert result.rejected["forbidden"] > 0
    assert all(forbidden_keyword(row["prompt"], words) is None for row in result.rows)


def test_attempts_cap_ends_the_run_short_of_target(taught_gpt2, caplog):
    model, tokenizer = taught_gpt2
    result = generate_instructions(
        model, tokenizer, SEEDS, config(target_size=20, max_attempts=20), seed=0, model_digest="abc123"
    )
    assert result.stopped == "max_attempts" and result.attempts == 20 and result.rounds == 2  # 16 + 4
    assert len(result.rows) < 20
    assert result.attempts == len(result.rows) + sum(result.rejected.values())
    assert "stopped after max_attempts" in caplog.text


def test_seed_too_long_for_the_context_is_never_shown(taught_gpt2):
    model, tokenizer = taught_gpt2
    seeds = [*SEEDS, {"prompt": "Explain " + "the gene " * 150, "response": "No."}]
    result = generate_instructions(model, tokenizer, seeds, config(target_size=2), seed=0, model_digest="abc123")
    assert all(f"seed-{len(SEEDS)}" not in row["shown_ids"] + row["response_shown_ids"] for row in result.rows)
    with pytest.raises(ValueError, match="no seed instruction fits"):
        generate_instructions(model, tokenizer, seeds[-1:], config(), seed=0, model_digest="abc123")


def test_bad_inputs_fail_before_generating(taught_gpt2):
    model, tokenizer = taught_gpt2
    with pytest.raises(ValueError, match="needs seed instructions"):
        generate_instructions(model, tokenizer, [], config(), seed=0, model_digest="abc123")
    with pytest.raises(ValueError, match=r"seeds\[1\] needs a non-empty string 'response'"):
        generate_instructions(
            model, tokenizer, [SEEDS[0], {"prompt": "Name a gene."}], config(), seed=0, model_digest="abc123"
        )
    with pytest.raises(ValueError, match="placeholder"):
        generate_instructions(model, tokenizer, SEEDS, config(), template="Q: A:", seed=0, model_digest="abc123")


def test_written_split_loads_and_feeds_the_sft_objective(taught_gpt2, generated, tmp_path):
    model, tokenizer = taught_gpt2
    ref = write_instructions(generated, name="selfinstruct", out_dir=tmp_path)
    assert ref.rows == len(generated.rows) and ref.name == "selfinstruct/train"
    records = load_records(ref)  # checks the digest too
    assert records == list(generated.rows)
    items = [
        encode_sft(tokenizer, r["prompt"], r["response"], template=DEFAULT_TEMPLATE, max_length=128) for r in records
    ]
    objective = InstructionSFT(tokenizer.pad_token_id)
    batch = objective.collate(items)
    assert batch["n_targets"] > 0
    with torch.no_grad():
        loss = objective.loss(model, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    assert write_instructions(generated, name="selfinstruct", out_dir=tmp_path) == ref  # content-addressed


def test_writing_nothing_says_why(tmp_path):
    empty = SelfInstructResult(
        rows=(),
        attempts=5,
        rejected=dict.fromkeys(REASONS, 0) | {"similar": 5},
        rounds=1,
        stopped="max_attempts",
        seeds=3,
    )
    with pytest.raises(DataError, match="kept no instruction in 5 attempts.*similar 5"):
        write_instructions(empty, name="selfinstruct", out_dir=tmp_path)


class ScriptedLM(torch.nn.Module):
    """A stand-in decoder whose samples the test writes: `generate` appends the next scripted instruction to a
    generation prompt (one ending "Task n:") and the next scripted answer to any other, cut at the token budget
    as a real model's would be. It pins down the loop's bookkeeping on outputs a tiny model might never give."""

    def __init__(self, tokenizer, instructions: list[str], answers: list[str], context: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # generate_instructions reads the device off one
        self.config = type("Config", (), {"max_position_embeddings": context})()
        self.tokenizer, self.instructions, self.answers = tokenizer, list(instructions), list(answers)

    def generate(self, *, input_ids, attention_mask, max_new_tokens, pad_token_id, **sampling):
        rows = []
        for prompt in input_ids.tolist():
            text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            script = self.instructions if re.search(r"Task \d+:$", text) else self.answers
            rows.append(prompt + self.tokenizer(script.pop(0), add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def test_the_loop_counts_each_candidate_under_the_filter_that_stopped_it(taught_gpt2):
    _, tokenizer = taught_gpt2
    eos = tokenizer.eos_token
    long_one = "Explain why " + " ".join(["insulin"] * 10) + " matter."
    assert len(tokenizer(long_one)["input_ids"]) < 63  # written whole, but no room is left to answer it
    round_1 = [
        "Describe how insulin moves glucose into cells.\n",  # kept
        "Describe how insulin moves glucose into the cells.\n",  # similar to the one just kept (same round)
        "describe how insulin moves glucose into cells\n",  # duplicate of it, after normalisation
        "List three symptoms of type 2 diabetes.\n",  # duplicate of a seed
        "Draw the structure of insulin for students.\n",  # forbidden
        f"{long_one}\n",  # its prompt and 96 new tokens exceed the context: too_long
        "Name two drugs that lower blood pressure",  # no end of line within the budget: truncated
        "Explain what a biopsy is to a patient.\n",  # answered by repeating it: response_echo
    ]
    round_2 = [
        "Summarise the main risk factors for stroke.\n",  # kept
        "Outline how a clinician confirms sepsis quickly.\n",  # kept: target reached
        "Compare two common tests used for anaemia screening.\n",  # passes everything, not needed: surplus
        *["\n"] * 5,  # empty
    ]
    answers = [
        f"Insulin signals cells to take up glucose.{eos}",
        f"Through GLUT4 transporters.{eos}",
        f"It binds its receptor.{eos}",
        f"Explain what a biopsy is to a patient.{eos}",
        f"Age, hypertension and smoking.{eos}",
        f"Blood cultures and lactate.{eos}",
        f"Haemoglobin and ferritin.{eos}",
    ]
    model = ScriptedLM(tokenizer, round_1 + round_2, answers, context=160)
    c = config(
        target_size=3, max_attempts=16, batch_size=8, max_new_tokens=64, response_max_new_tokens=96, response_examples=0
    )
    result = generate_instructions(model, tokenizer, SEEDS, c, seed=0, model_digest="scripted")

    assert not model.instructions and not model.answers  # every scripted sample was asked for
    assert [(r["prompt"], r["response"], r["round"]) for r in result.rows] == [
        ("Describe how insulin moves glucose into cells.", "Insulin signals cells to take up glucose.", 1),
        ("Summarise the main risk factors for stroke.", "Age, hypertension and smoking.", 2),
        ("Outline how a clinician confirms sepsis quickly.", "Blood cultures and lactate.", 2),
    ]
    assert {k: v for k, v in result.rejected.items() if v} == {
        "similar": 1,
        "duplicate": 2,
        "forbidden": 1,
        "too_long": 1,
        "truncated": 1,
        "response_echo": 1,
        "surplus": 1,
        "empty": 5,
    }
    assert (result.attempts, result.rounds, result.stopped) == (16, 2, "target_size")
    assert all(row["response_shown_ids"] == [] for row in result.rows)
