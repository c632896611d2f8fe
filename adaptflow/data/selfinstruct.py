"""Self-Instruct generation for decoders (Wang et al. 2022): seed instructions in, a filtered SFT dataset out.

    result = generate_instructions(model, tokenizer, seeds, config, template=..., seed=0, model_digest=...)
    ref = write_instructions(result, name="selfinstruct", out_dir=...)   # an sft train split, with provenance

Each round shows the model a numbered list ("Task 1: ...") of `seed_examples` seed and `generated_examples`
generated instructions, once per prompt of a batch, and samples the next line. A candidate is kept only if it
is a complete line of `min_words`..`max_words` words that starts with a letter or digit, names no forbidden
keyword, fits the model's context, is no duplicate of an earlier instruction (same words in the same order,
ignoring case and punctuation) and scores ROUGE-L F1 below `max_rouge_l` against *every* instruction so far
(seeds and kept ones). The model then answers it in the fine-tuning prompt template, after `response_examples`
seed demonstrations, and the answer must end (eos, or the template's next instruction marker), be non-empty,
not repeat the instruction and hold at most `max_response_words` words.

Every candidate is counted once: ``attempts == len(rows) + sum(rejected.values())``. Generation stops at
`target_size` rows or `max_attempts` candidates, and the result says which. The same model, seeds, config and
seed give the same rows. Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import torch
from pydantic import Field, model_validator

from adaptflow.config.base import PositiveFloat, PositiveInt, Reference, Section
from adaptflow.data.formats import SAFE_NAME
from adaptflow.data.labelled import write_records
from adaptflow.errors import DataError
from adaptflow.kinds.sft import DEFAULT_PROMPT_TEMPLATE
from adaptflow.refs import DatasetRef

log = logging.getLogger(__name__)

# Tasks a text-only model cannot do, from the Self-Instruct paper's filter (whole words, case-insensitive).
FORBIDDEN_KEYWORDS = (
    "image",
    "images",
    "picture",
    "pictures",
    "graph",
    "graphs",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)


class SelfInstructConfig(Section):
    """Self-Instruct (Wang et al. 2022) for decoders: the model grows an instruction dataset from the train
    split of `seed_task` (an sft task). Each round samples new instructions from a prompt listing
    `seed_examples` seed and `generated_examples` generated ones, keeps those that pass the length, keyword
    and ROUGE-L filters, and answers each with the fine-tuning prompt template (after `response_examples`
    seed demonstrations). Stops at `target_size` kept or `max_attempts` candidates, whichever comes first."""

    enabled: bool = True
    seed_task: Annotated[str, Reference("tasks", kind="sft",
                                        fine_tuned="self_instruct makes that task's training split")]
    target_size: PositiveInt = 500
    max_attempts: PositiveInt | None = None  # candidate instructions sampled at most; default 20 × target_size
    batch_size: PositiveInt = 16  # prompts sampled per generate call (one round)
    header: str = "Come up with a series of tasks:"
    seed_examples: Annotated[int, Field(ge=0)] = 6
    generated_examples: Annotated[int, Field(ge=0)] = 2
    response_examples: Annotated[int, Field(ge=0)] = 2
    max_new_tokens: PositiveInt = 64  # per instruction (one line)
    response_max_new_tokens: PositiveInt = 256
    temperature: PositiveFloat = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.5
    max_rouge_l: Annotated[float, Field(gt=0, le=1)] = 0.7  # keep an instruction only below this with every other
    min_words: PositiveInt = 4
    max_words: PositiveInt = 150
    max_response_words: PositiveInt = 300
    forbidden_keywords: list[str] = Field(default_factory=lambda: list(FORBIDDEN_KEYWORDS))
    seed: int | None = None  # default: the recipe's seed

    @model_validator(mode="after")
    def _consistent(self) -> SelfInstructConfig:
        if self.seed_examples + self.generated_examples == 0:
            raise ValueError("seed_examples + generated_examples must be > 0: the model needs examples to continue")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if self.max_attempts is not None and self.max_attempts < self.target_size:
            raise ValueError(
                f"max_attempts ({self.max_attempts}) must be >= target_size ({self.target_size}); "
                "most candidates are filtered out, so allow several attempts per kept instruction"
            )
        if any(not keyword.strip() for keyword in self.forbidden_keywords):
            raise ValueError("forbidden_keywords must not contain empty strings (they would match everything)")
        return self

    @property
    def attempts_cap(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 20 * self.target_size


SEED_PREFIX, GENERATED_PREFIX = "seed-", "gen-"

# Why a candidate was dropped, in the order the filters run (every key is always present in `rejected`).
REASONS = (
    "empty",  # nothing but whitespace
    "truncated",  # the line did not end within max_new_tokens
    "format",  # does not start with a letter or digit (a list marker, code, a stray quote)
    "too_short",
    "too_long",  # more than max_words, or too long to show or answer within the model's context
    "forbidden",  # names a forbidden keyword
    "duplicate",  # same words as an earlier instruction
    "similar",  # ROUGE-L F1 >= max_rouge_l with an earlier instruction
    "response_truncated",  # the answer did not end within response_max_new_tokens
    "response_empty",
    "response_too_long",
    "response_echo",  # the answer only repeats the instruction
    "surplus",  # passed every filter after target_size was already reached
)

# The provenance of every row, next to the `prompt` and `response` the sft task type reads.
SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("id", pa.string()),  # gen-000001, in the order rows were kept
        ("round", pa.int64()),  # the generation round (batch) it came from, from 1
        ("shown_ids", pa.list_(pa.string())),  # instructions listed in its generation prompt, in order
        ("response_shown_ids", pa.list_(pa.string())),  # seed demonstrations shown before its answer
        ("rouge_l_max", pa.float64()),  # its highest ROUGE-L F1 against every earlier instruction
        ("nearest_id", pa.string()),  # the instruction that scored it ("" when nothing shares a word)
        ("generator", pa.string()),  # digest of the model that wrote it
        ("sampling", pa.string()),  # JSON: temperature, top_p, token budgets, seed
    ]
)

_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class SelfInstructResult:
    """What a Self-Instruct run kept and why it dropped the rest.

    ``rows`` follow ``SCHEMA``; ``rejected`` counts candidates per reason in ``REASONS``; ``rounds`` is the
    number of generation batches, ``seeds`` the number of seed instructions; ``stopped`` is ``"target_size"``
    or ``"max_attempts"`` (the cap ran out first: fewer rows than asked for).
    """

    rows: tuple[dict, ...]
    attempts: int
    rejected: dict[str, int]
    rounds: int
    stopped: str
    seeds: int

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": list(self.rows)}


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokens: the lower-cased runs of letters and digits.

    On ASCII text these are exactly rouge_score's default tokens. That tokenizer also drops every non-ASCII
    letter, so instructions in Greek or Chinese would score 0 against each other and never be caught as near
    duplicates; here a letter is any Unicode letter.
    """
    return _WORD.findall(text.lower())


class RougeIndex:
    """The instructions so far, for the highest ROUGE-L F1 of a new one against all of them.

    ROUGE-L F1 is 2·LCS/(m+n), and a longest common subsequence is never longer than the tokens two texts share
    (as multisets), so 2·shared/(m+n) bounds it. An inverted index gives ``shared`` for every instruction at
    once; rouge_score's exact LCS then runs in decreasing order of that bound, only until the bound falls to
    the best score found. The maximum is exact (tests compare it with a plain scan), and each text is
    tokenised once: against 5,000 abstract sentences a query took 3–5 ms, scoring every pair 190–370 ms.
    """

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._known: dict[str, list[str]] = {}
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_KnownTokens(self._known))
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._lengths: list[int] = []
        self._postings: dict[str, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key: str, text: str) -> None:
        tokens = self._known.setdefault(text, rouge_tokens(text))
        index = len(self._ids)
        self._ids.append(key)
        self._texts.append(text)
        self._lengths.append(len(tokens))
        for token, count in Counter(tokens).items():
            self._postings.setdefault(token, []).append((index, count))

    def nearest(self, text: str, *, stop_at: float | None = None) -> tuple[float, str]:
        """``(highest ROUGE-L F1, id of that instruction)``, or ``(0.0, "")`` when none shares a token.

        With ``stop_at``, returns as soon as some instruction scores at least that (a lower bound then).
        """
        tokens = rouge_tokens(text)
        shared: Counter[int] = Counter()
        for token, count in Counter(tokens).items():
            for index, other in self._postings.get(token, ()):
                shared[index] += min(count, other)
        bounds = sorted(((2 * n / (len(tokens) + self._lengths[i]), i) for i, n in shared.items()), reverse=True)
        best, nearest = 0.0, ""
        added = text not in self._known
        self._known[text] = tokens
        try:
            for bound, index in bounds:
                if bound <= best:
                    break
                score = self._scorer.score(self._texts[index], text)["rougeL"].fmeasure
                if score > best:
                    best, nearest = score, self._ids[index]
                    if stop_at is not None and best >= stop_at:
                        break
        finally:
            if added:
                del self._known[text]
        return best, nearest


class _KnownTokens:
    """A rouge_score tokenizer that looks texts up instead of tokenising both sides of every pair again."""

    def __init__(self, known: dict[str, list[str]]):
        self.known = known

    def tokenize(self, text: str) -> list[str]:
        tokens = self.known.get(text)
        return tokens if tokens is not None else rouge_tokens(text)


def forbidden_keyword(text: str, keywords: list[str]) -> str | None:
    """The first of ``keywords`` that ``text`` contains as whole words (case-insensitive), else None."""
    for keyword in keywords:
        words = r"\s+".join(re.escape(word) for word in keyword.split())
        if re.search(rf"(?<!\w){words}(?!\w)", text, flags=re.IGNORECASE):
            return keyword
    return None


def instruction_prompt(header: str, instructions: list[str]) -> str:
    """The generation prompt: the header, ``Task i: <instruction>`` lines, and an open ``Task n+1:`` line."""
    lines = [header, *(f"Task {i}: {_one_line(text)}" for i, text in enumerate(instructions, 1))]
    return "\n".join(lines) + f"\nTask {len(instructions) + 1}:"


def instruction_rejection(text: str, config: SelfInstructConfig) -> str | None:
    """The first text-only filter ``text`` (one parsed line) fails, as a key of ``REASONS``, else None.

    The filters that need the model (context fit) or the other instructions (duplicate, similar) are separate.
    """
    if not text.strip():
        return "empty"
    if not text.lstrip()[0].isalnum():
        return "format"
    words = len(text.split())
    if words < config.min_words:
        return "too_short"
    if words > config.max_words:
        return "too_long"
    if forbidden_keyword(text, config.forbidden_keywords) is not None:
        return "forbidden"
    return None


def response_rejection(response: str, instruction: str, config: SelfInstructConfig) -> str | None:
    """The first filter a complete answer fails, as a key of ``REASONS``, else None."""
    if not response.strip():
        return "response_empty"
    if len(response.split()) > config.max_response_words:
        return "response_too_long"
    if rouge_tokens(response) == rouge_tokens(instruction):
        return "response_echo"
    return None


def generate_instructions(
    model,
    tokenizer,
    seeds: list[dict],
    config: SelfInstructConfig,
    *,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    seed: int,
    model_digest: str,
) -> SelfInstructResult:
    """Grow ``seeds`` (records with ``prompt`` and ``response``, e.g. an sft task's train split read with
    ``labelled.load_records``) into new instruction/response rows written by ``model`` (a causal LM).

    ``template`` is the fine-tuning prompt template (``stages.finetune.prompt_template``), so the answers are
    written in the format SFT will train on. ``model_digest`` is recorded in every row. The model is put in
    eval mode for the run and back as it was after. Raises ``ValueError`` for unusable seeds, or when no seed
    instruction fits the model's context with the configured token budgets.
    """
    _check_seeds(seeds, config)
    if "{prompt}" not in template:
        raise ValueError(
            f"prompt template {template!r} has no {{prompt}} placeholder; set stages.finetune."
            "prompt_template to one that has, e.g. '### Instruction:\\n{prompt}\\n\\n### Response:\\n'"
        )
    run = _Run(model, tokenizer, seeds, config, template, seed, model_digest)
    with _eval_mode(model):
        return run.loop()


def write_instructions(result: SelfInstructResult, *, name: str, out_dir: str | Path,
                       seeds: Sequence[dict] = ()) -> DatasetRef:
    """Write the rows as ``<out_dir>/<name>-<digest>/train.parquet``: an sft split with provenance columns.

    ``seeds`` (the seed task's records) go first, as ``seed-<i>`` rows of round 0, so a training split holds
    both with their origin. ``labelled.load_records`` reads it back (and checks its digest) and the sft task
    type uses its ``prompt`` and ``response``; the other columns follow ``SCHEMA``. Raises ``DataError`` when
    no row was kept.
    """
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a directory)")
    if not result.rows:
        reasons = ", ".join(f"{k} {v}" for k, v in result.rejected.items() if v) or "none"
        raise DataError(
            f"self-instruct kept no instruction in {result.attempts} attempts (rejected: {reasons}); raise "
            "max_attempts, loosen the filter that rejected most, or start from a stronger model"
        )
    rows = [{"prompt": seed["prompt"], "response": seed["response"], "id": f"{SEED_PREFIX}{i}", "round": 0,
             "shown_ids": [], "response_shown_ids": [], "rouge_l_max": None, "nearest_id": "", "generator": "",
             "sampling": ""} for i, seed in enumerate(seeds)]
    rows += result.rows
    return write_records(rows, SCHEMA, name=name, split="train", out_dir=out_dir)


class _Run:
    """One generation run: the seeds, the pool of instructions so far, the random state and the counts."""

    def __init__(self, model, tokenizer, seeds, config: SelfInstructConfig, template, seed, model_digest):
        self.model, self.tokenizer, self.config, self.template = model, tokenizer, config, template
        self.rng = random.Random(seed)
        self.seed, self.model_digest = seed, model_digest
        self.context = _context_size(model)
        # The template's text before the instruction ("### Instruction:") starts a new example: an answer that
        # writes it has ended (a base model often goes on to invent the next task).
        self.marker = template.split("{prompt}", 1)[0].strip()
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        # Demonstrations are separated the way SFT examples end (eos), else by a blank line.
        self.separator = tokenizer.eos_token or "\n\n"

        self.texts: dict[str, str] = {}
        self.pool = RougeIndex()
        self.seen: set[tuple[str, ...]] = set()
        for i, record in enumerate(seeds):
            self._remember(f"{SEED_PREFIX}{i}", record["prompt"])
        self.seed_ids = [f"{SEED_PREFIX}{i}" for i, r in enumerate(seeds) if self._fits_both(r["prompt"])]
        if not self.seed_ids:
            raise ValueError(
                f"no seed instruction fits the model's context of {self.context} tokens together with "
                f"max_new_tokens {config.max_new_tokens} / response_max_new_tokens "
                f"{config.response_max_new_tokens}; lower those, or use shorter seed instructions"
            )
        if len(self.seed_ids) < len(seeds):
            log.warning(
                "self-instruct: %d of %d seed instructions are too long for the model's context and are "
                "never shown (they still count for ROUGE-L)",
                len(seeds) - len(self.seed_ids),
                len(seeds),
            )
        self.seed_records = {f"{SEED_PREFIX}{i}": record for i, record in enumerate(seeds)}
        self.seeds = len(seeds)
        self.generated_ids: list[str] = []
        self.rows: list[dict] = []
        self.rejected = dict.fromkeys(REASONS, 0)
        self.attempts = 0
        self.sampling = json.dumps(
            {
                "temperature": config.temperature,
                "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens,
                "response_max_new_tokens": config.response_max_new_tokens,
                "seed": seed,
            },
            sort_keys=True,
        )

    def loop(self) -> SelfInstructResult:
        config = self.config
        cap, rounds = config.attempts_cap, 0
        while len(self.rows) < config.target_size and self.attempts < cap:
            rounds += 1
            self._round(rounds, min(config.batch_size, cap - self.attempts))
            log.info(
                "self-instruct round %d: %d attempts, %d kept, rejected %s",
                rounds,
                self.attempts,
                len(self.rows),
                {k: v for k, v in self.rejected.items() if v},
            )
        stopped = "target_size" if len(self.rows) >= config.target_size else "max_attempts"
        if stopped == "max_attempts":
            log.warning(
                "self-instruct stopped after max_attempts (%d candidates) with %d of %d instructions; most were "
                "rejected as %s. Raise max_attempts, loosen that filter, or start from a stronger model",
                self.attempts,
                len(self.rows),
                config.target_size,
                max(self.rejected, key=self.rejected.get),
            )
        return SelfInstructResult(
            rows=tuple(self.rows),
            attempts=self.attempts,
            rejected=dict(self.rejected),
            rounds=rounds,
            stopped=stopped,
            seeds=self.seeds,
        )

    def _round(self, number: int, size: int) -> None:
        config = self.config
        shown = [self._fit_examples(self._choose_examples()) for _ in range(size)]
        prompts = [instruction_prompt(config.header, [self.texts[i] for i in ids]) for ids in shown]
        outputs = self._sample(prompts, config.max_new_tokens, stop="\n")
        self.attempts += size

        # Phase 1: filters that need only the text and the pool before this round.
        candidates = []
        for ids, output in zip(shown, outputs, strict=True):
            text, complete = self._parse_instruction(output)
            reason = "truncated" if text.strip() and not complete else instruction_rejection(text, config)
            if reason is None and not self._fits_both(text):
                reason = "too_long"
            if reason is None and tuple(rouge_tokens(text)) in self.seen:
                reason = "duplicate"
            score, nearest = (0.0, "")
            if reason is None:
                score, nearest = self.pool.nearest(text, stop_at=config.max_rouge_l)
                if score >= config.max_rouge_l:
                    reason = "similar"
            if reason is None:
                candidates.append({"prompt": text, "shown_ids": ids, "rouge_l_max": score, "nearest_id": nearest})
            else:
                self.rejected[reason] += 1
        if not candidates:
            return

        # Phase 2: answers, then each survivor against the ones kept earlier in this round.
        demos = [self._fit_demos(c["prompt"], self._choose_demos()) for c in candidates]
        prompts = [self._response_prompt(c["prompt"], d) for c, d in zip(candidates, demos, strict=True)]
        outputs = self._sample(prompts, config.response_max_new_tokens, stop=self.marker or None)
        kept_now = RougeIndex()  # this round's kept instructions: phase 1 could not see them
        for candidate, demo_ids, output in zip(candidates, demos, outputs, strict=True):
            response, complete = self._parse_response(output)
            reason = "response_truncated" if not complete else response_rejection(response, candidate["prompt"], config)
            if reason is None and tuple(rouge_tokens(candidate["prompt"])) in self.seen:
                reason = "duplicate"
            if reason is None:
                score, nearest = kept_now.nearest(candidate["prompt"])
                if score > candidate["rouge_l_max"]:
                    candidate["rouge_l_max"], candidate["nearest_id"] = score, nearest
                if score >= config.max_rouge_l:
                    reason = "similar"
            if reason is None and len(self.rows) >= config.target_size:
                reason = "surplus"
            if reason is not None:
                self.rejected[reason] += 1
                continue
            row_id = f"{GENERATED_PREFIX}{len(self.rows) + 1:06d}"
            self.rows.append(
                {
                    "prompt": candidate["prompt"],
                    "response": response,
                    "id": row_id,
                    "round": number,
                    "shown_ids": list(candidate["shown_ids"]),
                    "response_shown_ids": demo_ids,
                    "rouge_l_max": candidate["rouge_l_max"],
                    "nearest_id": candidate["nearest_id"],
                    "generator": self.model_digest,
                    "sampling": self.sampling,
                }
            )
            self._remember(row_id, candidate["prompt"])
            self.generated_ids.append(row_id)
            kept_now.add(row_id, candidate["prompt"])

    def _remember(self, key: str, text: str) -> None:
        self.texts[key] = text
        self.pool.add(key, text)
        self.seen.add(tuple(rouge_tokens(text)))

    def _choose_examples(self) -> list[str]:
        # As in the paper: up to `generated_examples` generated instructions, seeds for the rest, shuffled.
        config = self.config
        total = config.seed_examples + config.generated_examples
        generated = self.rng.sample(self.generated_ids, min(config.generated_examples, len(self.generated_ids)))
        seeds = self.rng.sample(self.seed_ids, min(total - len(generated), len(self.seed_ids)))
        ids = seeds + generated
        self.rng.shuffle(ids)
        return ids

    def _fit_examples(self, ids: list[str]) -> list[str]:
        # Drop examples from the front until the prompt and the new tokens fit; one always fits (checked
        # for seeds up front, for generated instructions by the too_long filter).
        while len(ids) > 1 and not self._fits(
            instruction_prompt(self.config.header, [self.texts[i] for i in ids]), self.config.max_new_tokens
        ):
            ids = ids[1:]
        return ids

    def _choose_demos(self) -> list[str]:
        return self.rng.sample(self.seed_ids, min(self.config.response_examples, len(self.seed_ids)))

    def _fit_demos(self, instruction: str, ids: list[str]) -> list[str]:
        while ids and not self._fits(self._response_prompt(instruction, ids), self.config.response_max_new_tokens):
            ids = ids[1:]
        return ids

    def _response_prompt(self, instruction: str, demo_ids: list[str]) -> str:
        records = [self.seed_records[i] for i in demo_ids]
        shown = [self.template.format(prompt=r["prompt"]) + r["response"] for r in records]
        return "".join(text + self.separator for text in shown) + self.template.format(prompt=instruction)

    def _fits_both(self, instruction: str) -> bool:
        config = self.config
        return self._fits(instruction_prompt(config.header, [instruction]), config.max_new_tokens) and self._fits(
            self.template.format(prompt=instruction), config.response_max_new_tokens
        )

    def _fits(self, prompt: str, new_tokens: int) -> bool:
        return self.context is None or len(self._encode(prompt)) + new_tokens <= self.context

    def _encode(self, text: str) -> list[int]:
        # No special tokens: encode_sft adds none before the prompt either.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _sample(self, prompts: list[str], max_new_tokens: int, *, stop: str | None) -> list[list[int]]:
        """The new token ids of one sample per prompt (left-padded batch; same seed, same samples)."""
        encoded = [self._encode(p) for p in prompts]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
        device = next(self.model.parameters()).device
        config = self.config
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.rng.getrandbits(63))
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad,
                eos_token_id=self.eos,
                stop_strings=stop,
                tokenizer=self.tokenizer,
            )
        return [row[width:].tolist() for row in out.cpu()]

    def _parse_instruction(self, ids: list[int]) -> tuple[str, bool]:
        """``(first line of the sample, whitespace collapsed, first letter upper-cased; whether it ended)``."""
        ids, ended = _until_eos(ids, self.eos)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if "\n" in text:
            text, ended = text.split("\n", 1)[0], True
        text = _one_line(text)
        return text[:1].upper() + text[1:], ended

    def _parse_response(self, ids: list[int]) -> tuple[str, bool]:
        ids, ended = _until_eos(ids, self.eos)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.marker and self.marker in text:
            text, ended = text.split(self.marker, 1)[0], True
        return text.strip(), ended


def _check_seeds(seeds: list[dict], config: SelfInstructConfig) -> None:
    fix = "pass the records of an sft task's train split (labelled.load_records)"
    if not seeds:
        raise ValueError(f"self-instruct needs seed instructions, got none; {fix}")
    needs = ("prompt", "response") if config.response_examples else ("prompt",)
    for i, record in enumerate(seeds):
        for field in needs:
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or (field == "prompt" and not value.strip()):
                raise ValueError(f"seeds[{i}] needs a non-empty string {field!r}, got {value!r:.60}; {fix}")


def _until_eos(ids: list[int], eos: int | None) -> tuple[list[int], bool]:
    if eos is not None and eos in ids:
        return ids[: ids.index(eos)], True
    return ids, False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _context_size(model) -> int | None:
    # GPT-2 calls it n_positions (aliased to max_position_embeddings); a model without one is not limited here.
    return getattr(model.config, "max_position_embeddings", None)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)
