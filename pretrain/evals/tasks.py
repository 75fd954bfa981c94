"""Downstream task files: read (local or s3://), checked line by line, and turned into the
(context, continuation) requests that `scoring` scores.

The file format is llm-foundry's in-context-learning JSONL, which nanochat's CORE tasks use
too, one example per line:
  multiple choice     {"query": "...", "choices": ["...", "..."], "gold": 0}
  language modelling  {"context": "...", "continuation": "..."}

A request's context is `prompt`, then `num_fewshot` solved examples each followed by
`example_delimiter`, then the question; its continuation is `continuation_delimiter` plus
one choice (or the expected continuation). This is lm-evaluation-harness's layout
(`target_delimiter` before the answer), so a task scores the same there (see
`pretrain.evals.harness`). Few-shot examples are drawn per example from the same file with
a generator seeded by (fewshot_seed, example index), never the example itself: a prompt
depends on nothing but the file and the config, whichever rank builds it.

Rank 0 reads each file once and the others receive the parsed examples, so 1,024 ranks do
not each fetch the same object from the store at every start.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pretrain import objstore
from pretrain.config.checks import task_name
from pretrain.config.schema import EvalTaskConfig
from pretrain.errors import ConfigError, DataError, StoreError

FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass(frozen=True)
class Request:
    """One scored sequence: an example's context and one of its continuations."""

    example: int
    context: str
    continuation: str


@dataclass
class Task:
    cfg: EvalTaskConfig
    examples: list[dict]  # the file's examples (all of them: the few-shot pool)

    @property
    def name(self) -> str:
        return task_name(self.cfg)

    @property
    def type(self) -> str:
        return self.cfg.type

    @property
    def metric(self) -> str:
        if self.cfg.metric:
            return self.cfg.metric
        return "acc_norm" if self.type == "multiple_choice" else "acc"

    @property
    def scored(self) -> int:
        """How many examples are scored (the first `limit`, or all)."""
        n = len(self.examples)
        return min(n, self.cfg.limit) if self.cfg.limit else n

    def answers(self, example: dict) -> list[str]:
        if self.type == "multiple_choice":
            return list(example["choices"])
        return [example["continuation"]]

    def question(self, example: dict) -> str:
        return example["query"] if self.type == "multiple_choice" else example["context"]

    def solved(self, example: dict) -> str:
        gold = example["gold"] if self.type == "multiple_choice" else 0
        return (
            self.question(example) + self.cfg.continuation_delimiter + self.answers(example)[gold]
        )

    def context(self, i: int) -> str:
        c = self.cfg
        shots = ""
        if c.num_fewshot:
            rng = random.Random(f"{c.fewshot_seed}:{i}")  # str seeds hash the same everywhere
            picks = [j for j in rng.sample(range(len(self.examples)), c.num_fewshot + 1) if j != i]
            shots = "".join(self.solved(self.examples[j]) + c.example_delimiter for j in picks[: c.num_fewshot])  # fmt: skip
        return c.prompt + shots + self.question(self.examples[i])

    def requests(self) -> list[Request]:
        out = []
        for i in range(self.scored):
            context = self.context(i)
            for answer in self.answers(self.examples[i]):
                out.append(Request(i, context, self.cfg.continuation_delimiter + answer))
        return out


def read_tasks(configs: list[EvalTaskConfig], ranks=None) -> list[Task]:
    """The configured tasks, read and checked on rank 0 and sent to every rank of `ranks`
    (a `checkpoint.ranks.Ranks`; None: this process alone). A bad file is one `DataError`
    on every rank, naming the file, line and field."""
    rank0 = ranks is None or ranks.rank == 0
    result: list[list[dict]] | str | None = None
    if rank0:
        try:
            result = [parse(c.path, read_file(c.path), c) for c in configs]
        except (DataError, ConfigError, StoreError) as e:  # every rank must hear of it
            result = str(e)
    if ranks is not None:
        result = ranks.broadcast(result)
    if isinstance(result, str):
        raise DataError(result)
    return [Task(c, examples) for c, examples in zip(configs, result, strict=True)]


def read_file(path: str) -> bytes:
    if objstore.is_remote(path):
        return objstore.read_bytes(path)  # a StoreError names the object and the cause
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(
            f"{path}: cannot read the task file ({e.strerror}); check eval.tasks[].path"
        ) from None


def parse(path: str, data: bytes, cfg: EvalTaskConfig) -> list[dict]:
    """The examples of a JSONL task file; a bad line is a `DataError` naming file:line and
    the field."""
    examples = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); a task file is JSONL") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(example, dict):
            raise DataError(
                f"{path}:{n}: each line must be a JSON object, got {type(example).__name__}"
            )
        _check(example, cfg.type, f"{path}:{n}")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples (an empty task file)")
    if cfg.num_fewshot >= len(examples):
        raise DataError(
            f"{path}: num_fewshot={cfg.num_fewshot} needs more than {len(examples)} examples"
            " (shots come from the same file, never the question itself)"
        )
    return examples


def _check(example: dict, kind: str, where: str) -> None:
    for name in FIELDS[kind]:
        if name not in example:
            have = ", ".join(sorted(example)) or "none"
            raise DataError(
                f"{where}: field '{name}' is missing (a {kind} line has {', '.join(FIELDS[kind])}; "
                f"this one has {have})"
            )
    if kind == "language_modeling":
        for name in FIELDS[kind]:
            if not isinstance(example[name], str):
                raise DataError(f"{where}: field '{name}' must be a string")
        if not example["continuation"]:
            raise DataError(f"{where}: field 'continuation' is empty")
        return
    choices, gold = example["choices"], example["gold"]
    if not isinstance(example["query"], str):
        raise DataError(f"{where}: field 'query' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):  # fmt: skip
        raise DataError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(
            f"{where}: field 'gold' must be an index into 'choices' (0..{len(choices) - 1}), got {gold!r}"
        )
