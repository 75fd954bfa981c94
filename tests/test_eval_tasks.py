"""Downstream tasks without training: task files and their errors, prompts, tokenization
as lm-evaluation-harness does it, scores that do not depend on the world size, metrics,
and the config section. (The end-to-end tests, with a trained model, are test_eval.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.config.schema import EvalConfig, EvalTaskConfig
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import ConfigError, DataError
from pretrain.evals.evaluator import Evaluator
from pretrain.evals.records import metrics_record, task_scores
from pretrain.evals.scoring import encode_pair, results_table, score, task_metrics
from pretrain.evals.tasks import Request, Task, parse, read_tasks
from pretrain.model.config import ModelConfig
from pretrain.model.transformer import Transformer
from tests.helpers.runs import REPO

MC = [
    {
        "query": "To be, or not to be:",
        "choices": ["that is the question", "a horse", "the king"],
        "gold": 0,
    },
    {
        "query": "Now is the winter of our",
        "choices": ["discontent", "summer", "spring", "glass"],
        "gold": 0,
    },
    {"query": "A horse! a horse!", "choices": ["my kingdom for a horse", "no"], "gold": 0},
    {"query": "Friends, Romans,", "choices": ["countrymen", "lend me", "ears"], "gold": 0},
    {"query": "Out, damned", "choices": ["spot", "dog", "candle"], "gold": 0},
]
LM = [
    {"context": "The lady doth protest too", "continuation": "much"},
    {"context": "All the world's a", "continuation": "stage"},
    {"context": "", "continuation": "Exeunt"},
]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer(dataset) -> Tokenizer:
    return Tokenizer(dataset["tokenizer"])


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {"mc": write(tmp_path / "mc.jsonl", MC), "lm": write(tmp_path / "lm.jsonl", LM)}


def configs(files, **kw) -> list[EvalTaskConfig]:
    return [
        EvalTaskConfig(path=str(files["mc"]), **kw),
        EvalTaskConfig(path=str(files["lm"]), type="language_modeling", **kw),
    ]


# ------------------------------------------------------------ files and their errors
@pytest.mark.parametrize(
    "line, kind, message",
    [
        ("{not json", "multiple_choice", ":2: not JSON"),
        ("[1, 2]", "multiple_choice", ":2: each line must be a JSON object"),
        ('{"query": "q", "choices": ["a", "b"]}', "multiple_choice", ":2: field 'gold' is missing"),
        (
            '{"query": "q", "choices": ["a", "b"], "gold": 2}',
            "multiple_choice",
            ":2: field 'gold' must be an index into 'choices' (0..1), got 2",
        ),
        (
            '{"query": "q", "choices": ["a"], "gold": 0}',
            "multiple_choice",
            ":2: field 'choices' must be a list of at least 2",
        ),
        ('{"query": "q", "choices": ["a", "b"], "gold": true}', "multiple_choice", "field 'gold'"),
        (
            '{"context": "c", "continuation": ""}',
            "language_modeling",
            ":2: field 'continuation' is empty",
        ),
        (
            '{"context": 3, "continuation": "x"}',
            "language_modeling",
            ":2: field 'context' must be a string",
        ),
        (
            '{"query": "q", "choices": ["a", "b"], "gold": 0}',
            "language_modeling",
            ":2: field 'context' is missing",
        ),
    ],
)
def test_a_bad_line_is_one_error_naming_file_line_and_field(tmp_path, line, kind, message):
    good = MC[0] if kind == "multiple_choice" else LM[0]
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        parse(str(path), path.read_bytes(), EvalTaskConfig(path=str(path), type=kind))
    assert str(e.value).startswith(f"{path}:") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_empty_and_too_few_for_the_shots(tmp_path, files):
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read the task file"):
        read_tasks([EvalTaskConfig(path=str(tmp_path / "missing.jsonl"))])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_tasks([EvalTaskConfig(path=str(tmp_path / "empty.jsonl"))])
    with pytest.raises(DataError, match="num_fewshot=5 needs more than 5 examples"):
        read_tasks([EvalTaskConfig(path=str(files["mc"]), num_fewshot=5)])


def test_the_eval_section_is_checked_key_by_key(files):
    ok = [f"eval.tasks=[{{path: {files['mc']}}}]"]
    assert load_config(REPO / "configs/tiny.yaml", ok).eval.tasks[0].type == "multiple_choice"
    bad = {
        "eval.tasks[0].type must be one of multiple_choice, language_modeling": "type: cloze",
        "eval.tasks[0].metric must be one of acc for a language_modeling": "type: language_modeling, metric: acc_norm",
        "eval.tasks[0].num_fewshot must be >= 0": "num_fewshot: -1",
        "unknown key 'eval.tasks[0].shots'": "shots: 3",
    }
    for message, extra in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(REPO / "configs/tiny.yaml", [f"eval.tasks=[{{path: {files['mc']}, {extra}}}]"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"eval.tasks\[1\] and eval.tasks\[0\] are both named 'mc'"
    ):
        load_config(REPO / "configs/tiny.yaml", [f"eval.tasks=[{{path: {files['mc']}}}, {{path: {files['mc']}}}]"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"eval\.batch_size must be > 0"):
        load_config(REPO / "configs/tiny.yaml", ["eval.batch_size=0"])


# ------------------------------------------------------------ prompts and tokens
def test_fewshot_prompts_are_fixed_and_never_hold_the_question(files):
    cfg = EvalTaskConfig(path=str(files["mc"]), num_fewshot=2, prompt="Finish the line.\n")
    (task,) = read_tasks([cfg])
    for i, example in enumerate(task.examples):
        context = task.context(i)
        assert context.startswith("Finish the line.\n") and context.endswith(example["query"])
        shots = context[len(cfg.prompt) : -len(example["query"])].split(cfg.example_delimiter)
        assert len(shots) == 3 and shots[-1] == ""  # two shots, each followed by the delimiter
        assert all(example["query"] not in s for s in shots[:2])
        assert all(s in {task.solved(e) for e in task.examples} for s in shots[:2])
    assert [Task(cfg, task.examples).context(i) for i in range(5)] == [task.context(i) for i in range(5)]  # fmt: skip
    other_seed = Task(EvalTaskConfig(path=cfg.path, num_fewshot=2, fewshot_seed=7), task.examples)
    assert any(other_seed.context(i) != Task(EvalTaskConfig(path=cfg.path, num_fewshot=2), task.examples).context(i) for i in range(5))  # fmt: skip
    requests = task.requests()
    assert [r.continuation for r in requests[:3]] == [" " + c for c in MC[0]["choices"]]


def test_pairs_are_encoded_as_lm_evaluation_harness_does(tokenizer):
    """Our encode_pair against the harness's own TemplateLM._encode_pair, on the same
    tokenizer: a trailing space moves to the continuation, and the continuation is cut
    from the whole string's tokens (so a newline merged with a comma goes with it)."""
    from lm_eval.api.model import TemplateLM

    class Harness(TemplateLM):  # only what _encode_pair needs
        eot_token_id = tokenizer.eos_id
        tok_encode = staticmethod(lambda s, **kw: tokenizer.encode(s))
        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    harness = Harness()
    pairs = [("To be, or not to be: ", "that"), ("sorrow,", "\nThat I"), ("Exit", " Ghost."),
             ("My lord,\n", "I came"), ("a  b", "  c")]  # fmt: skip
    for context, continuation in pairs:
        assert encode_pair(tokenizer, context, continuation) == harness._encode_pair(context, continuation)  # fmt: skip
    assert encode_pair(tokenizer, "", "Exeunt") == ([tokenizer.eos_id], tokenizer.encode("Exeunt"))


# ------------------------------------------------------------ scores
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    m.init_weights()
    return m.eval()


def test_scores_do_not_depend_on_the_world_size(files, tokenizer):
    """Each rank's share, dealt for 1, 2, 3 and 4 ranks, merges (the sum of the ranks'
    tables, as `merge` all-reduces them) into the same numbers bit for bit; ranks with
    fewer batches run as many forwards as the others."""
    model = tiny_model()
    ev = Evaluator(EvalConfig(tasks=configs(files), batch_size=3), tokenizer, 64)
    assert len(ev.plan) == 6  # 17 sequences in batches of 3
    n = len(ev.encoded)

    forwards = []

    def forward(x, t, planned):
        forwards.append(x.shape[0])
        return model(x, t, loss_chunk_tokens=2, scores=True, planned_tokens=planned)

    one = score(forward, ev.encoded, ev.plan, 0, 1, ev.pad_id, "cpu")
    assert len(one) == n
    for world in (2, 3, 4):
        merged, counts = torch.zeros((n, 2), dtype=torch.float64), []
        for rank in range(world):
            before = len(forwards)
            merged += results_table(score(forward, ev.encoded, ev.plan, rank, world, ev.pad_id, "cpu"), n)  # fmt: skip
            counts.append(len(forwards) - before)
        assert torch.equal(merged, results_table(one, n)) and len(set(counts)) == 1
    # Each value is the log-probability of the continuation: check one by a plain forward.
    e = ev.encoded[0]
    logp = torch.log_softmax(model(torch.tensor([e.ids[:-1]])), -1)[0]
    expected = sum(logp[len(e.ids) - 1 - e.n_cont + k, e.ids[-e.n_cont + k]].item() for k in range(e.n_cont))  # fmt: skip
    assert one[0][0] == pytest.approx(expected, abs=1e-4)


def test_ranks_call_the_output_projection_alike_in_every_round(files, tokenizer):
    """A projection of split logits gathers them collectively (tensor parallelism), so in
    every round of the plan each rank, whatever its batch (or dummy), projects as often as
    the others: as often as the round's largest batch of scored tokens needs."""
    model = tiny_model()
    ev = Evaluator(EvalConfig(tasks=configs(files), batch_size=3), tokenizer, 64)
    calls, per_forward = [], []  # projections; how many each forward made
    project = model.lm_head.logits
    model.lm_head.logits = lambda h: (calls.append(1), project(h))[1]

    def forward(x, t, planned):
        before = len(calls)
        out = model(x, t, loss_chunk_tokens=2, scores=True, planned_tokens=planned)
        per_forward.append(len(calls) - before)
        return out

    for world in (2, 4):
        per_rank = []
        for rank in range(world):
            start = len(per_forward)
            score(forward, ev.encoded, ev.plan, rank, world, ev.pad_id, "cpu")
            per_rank.append(per_forward[start:])
        assert all(counts == per_rank[0] for counts in per_rank), (world, per_rank)
        assert max(per_rank[0]) > 1  # chunked: 2 scored tokens a call


def test_metrics_from_known_loglikelihoods(files):
    (mc, lm) = read_tasks(configs(files))
    requests = mc.requests()
    # Example 0: a wrong choice wins both ways; example 1: gold ("discontent") wins per
    # character only (-0.95 against -1.0), not in sum; the rest: gold wins both ways.
    ll = {0: [-5.0, -1.0, -9.0], 1: [-9.5, -6.0, -7.0, -8.0]}
    results = [(ll.get(r.example, [0.0] + [-9.0] * 3)[i], False) for r, i in zip(requests, _choice_index(requests), strict=True)]  # fmt: skip
    m = task_metrics(mc, requests, results)
    assert m["acc"] == 3 / 5 and m["acc_norm"] == 4 / 5
    chance = (1 / 3 + 1 / 4 + 1 / 2 + 1 / 3 + 1 / 3) / 5
    assert m["chance"] == pytest.approx(chance)
    assert m["centered"] == pytest.approx((4 / 5 - chance) / (1 - chance))  # acc_norm by default
    lm_requests = lm.requests()
    m = task_metrics(lm, lm_requests, [(-1.0, True), (-2.0, False), (-3.0, True)])
    assert (m["acc"], m["chance"], m["centered"]) == (2 / 3, 0.0, 2 / 3)
    record = metrics_record(
        7, {"core": 0.5, "tasks": {"lm": {**m, "metric": "acc"}}, "eval_s": 1.0}
    )
    assert record["step"] == 7 and record["eval/core"] == 0.5 and record["eval/lm"] == 2 / 3
    assert task_scores(record) == {"lm": 2 / 3}


def _choice_index(requests: list[Request]) -> list[int]:
    out, seen = [], {}
    for r in requests:
        out.append(seen.get(r.example, 0))
        seen[r.example] = out[-1] + 1
    return out


def test_a_continuation_longer_than_the_model_is_named(tmp_path, tokenizer):
    path = write(tmp_path / "long.jsonl", [{"context": "a", "continuation": "word " * 80}])
    cfg = EvalConfig(tasks=[EvalTaskConfig(path=str(path), type="language_modeling")])
    with pytest.raises(DataError, match=r"long\.jsonl: example 1's continuation .* it must be 1 to 64"):  # fmt: skip
        Evaluator(cfg, tokenizer, 64)
