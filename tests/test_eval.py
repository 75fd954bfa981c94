"""Downstream evaluation end to end: the demo model trained 300 steps on five plays, scored
during training (killed with kill -9 and resumed on the way) and afterwards by `pretrain
eval` on 1 and 2 ranks and by lm-evaluation-harness, on tasks made from six other plays.

One training run serves every test here (module fixture `trained`); the tests read it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.runs import (
    REPO,
    STRATEGIES,
    prep,
    read_metrics,
    run_cli,
    run_torchrun,
    shakespeare_texts,
    with_overrides,
)

pytestmark = pytest.mark.slow

STEPS, EVERY, SAVE_EVERY = 300, 100, 40
EXAMPLES = 120  # per task
IN_TRAINING_LIMIT = 40  # examples per task scored during training (the full files afterwards)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes at chance p."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    """word_order (4-way multiple choice) and cloze tasks from six plays never trained on."""
    out = tmp_path_factory.mktemp("tasks")
    held_out = [str(p) for p in shakespeare_texts()[8:14]]
    prep("tasks", "--inputs", *held_out, "--out", out, "--examples", str(EXAMPLES), "--seed", "1")
    return {"word_order": out / "word_order.jsonl", "cloze": out / "cloze.jsonl"}


def task_entries(tasks: dict[str, Path], limit: int = 0) -> list[dict]:
    return [
        {"path": str(tasks["word_order"]), "continuation_delimiter": "\n", "limit": limit},
        {"path": str(tasks["cloze"]), "type": "language_modeling", "limit": limit},
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tasks) -> Path:
    """configs/tiny.yaml's model, 300 steps on the session dataset, tasks scored every 100
    steps; killed with SIGKILL just after step 100's scores (the last checkpoint is step
    80's), then resumed to the end."""
    root = tmp_path_factory.mktemp("trained")
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["run"]["dir"] = str(root / "run")
    cfg["model"]["vocab_size"] = 512
    cfg["data"] = {"tokenizer": str(dataset["tokenizer"]), "streams": [{"path": str(dataset["mds"])}], "seq_len": 64}  # fmt: skip
    cfg["train"].update(max_steps=STEPS, global_batch_size=8, micro_batch_size=8, eval_every=EVERY, eval_batches=2, log_every=50)  # fmt: skip
    cfg["checkpoint"] = {"every": SAVE_EVERY, "keep_last": 10}
    cfg["parallel"] = {"threads": 1}
    cfg["logging"] = {"wandb": True, "wandb_mode": "offline"}
    cfg["eval"] = {
        "every": EVERY,
        "batch_size": 16,
        "tasks": task_entries(tasks, IN_TRAINING_LIMIT),
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = root / "run"
    cmd = [sys.executable, "-m", "pretrain", "train", str(config)]
    env = {**os.environ, "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("eval/core") is not None and r["step"] == EVERY for r in read_metrics(run)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    r = run_cli("train", str(config), timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def scored(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "eval/core" in r]


def test_scores_every_n_steps_survive_kill_and_resume(trained):
    records = read_metrics(trained)
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] < EVERY  # resumed before step 100's scores
    # Step 100's scores were written before the kill and not written again after the resume
    # redid steps 81-100; 200 and 300 were scored once each: no duplicate, none missing.
    assert [r["step"] for r in scored(trained)] == [100, 200, 300]
    assert records.index(resume[0]) > records.index(scored(trained)[0])
    for r in scored(trained):
        assert set(r) >= {"eval/core", "eval/word_order", "eval/word_order/acc", "eval/cloze"}


def pretrain_eval(checkpoint: Path, out: Path, *args: str, nproc: int = 0) -> dict:
    if nproc:
        run_torchrun(nproc, "-m", "pretrain", "eval", checkpoint, "--out", out, *args)
    else:
        r = run_cli("eval", str(checkpoint), "--out", str(out), *args)
        assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def score_here(model, cfg, tokenizer: Path, tasks: list[dict] | None = None) -> dict:
    """The report of `model` on `tasks` (default: cfg's eval.tasks) in this process."""
    from pretrain.config.schema import EvalTaskConfig
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.evals.evaluator import Evaluator

    if tasks is not None:
        cfg.eval.tasks = [EvalTaskConfig(**t) for t in tasks]
    ev = Evaluator(cfg.eval, Tokenizer(tokenizer), cfg.model.max_seq_len)
    chunk = cfg.parallel.loss_chunk_tokens

    def forward(x, t, planned):
        return model(x, t, loss_chunk_tokens=chunk, scores=True, planned_tokens=planned)

    return ev.run(forward, samples=True)


@pytest.mark.torchrun
def test_same_scores_on_one_and_two_ranks_and_as_during_training(trained, dataset, tmp_path):
    """The last checkpoint scored with the run's own eval.tasks on 2 torchrun ranks
    (`pretrain eval`) and in this one process gives the same log-likelihood for every
    request, bit for bit, and the scores that training logged at step 300."""
    from pretrain.tools.generate import load_model

    last = trained / "checkpoints" / f"step_{STEPS:08d}"
    two = pretrain_eval(last, tmp_path / "two.json", "--samples", nproc=2)
    model, cfg = load_model(last)
    one = score_here(model, cfg, dataset["tokenizer"])
    assert two["world_size"] == 2
    assert one["tasks"] == two["tasks"] and one["core"] == two["core"]
    assert len(one["tasks"]["word_order"]["samples"]) == 4 * IN_TRAINING_LIMIT
    logged = scored(trained)[-1]
    assert logged["eval/core"] == one["core"]
    for name, m in one["tasks"].items():
        assert logged[f"eval/{name}/acc"] == m["acc"]
        assert m["n"] == IN_TRAINING_LIMIT


def test_trained_model_beats_chance_untrained_does_not(trained, tasks, tmp_path, dataset):
    """Every example of each task: the trained model's word-order accuracy is above chance
    (1/4) at p < 1e-6 (one-sided binomial), and it completes more cloze words than the
    same model untrained, which is at chance on word order (two-sided p > 0.001)."""
    from pretrain.model.transformer import Transformer
    from pretrain.rundir import checkpoint_config, resolve_checkpoint

    report = pretrain_eval(trained, tmp_path / "r.json", "--limit", "0")  # the run's tasks, whole
    wo = report["tasks"]["word_order"]
    assert wo["n"] == EXAMPLES and wo["chance"] == 0.25
    assert binomial_tail(round(wo["acc_norm"] * EXAMPLES), EXAMPLES, 0.25) < 1e-6, wo

    cfg = checkpoint_config(resolve_checkpoint(trained))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    untrained = score_here(model.eval(), cfg, dataset["tokenizer"], task_entries(tasks))["tasks"]
    k0 = round(untrained["word_order"]["acc_norm"] * EXAMPLES)
    p_high, p_low = binomial_tail(k0, EXAMPLES, 0.25), 1 - binomial_tail(k0 + 1, EXAMPLES, 0.25)
    assert min(p_high, p_low) > 1e-3 / 2, untrained["word_order"]
    assert untrained["cloze"]["acc"] < report["tasks"]["cloze"]["acc"]


# The same two task files as lm-evaluation-harness tasks: the answer after "\n" for
# word_order (target_delimiter), after " " for cloze (a loglikelihood task's target is
# taken as written, so the delimiter goes into the template).
HARNESS_TASKS = {
    "word_order": """task: word_order
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{path}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "\\n"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "cloze": """task: cloze
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{path}"}}}}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: " {{{{continuation}}}}"
metric_list: [{{metric: acc}}]
""",
}


def harness_scores(model, tasks: dict[str, Path], folder: Path) -> dict[str, dict]:
    """lm-eval's per-request (loglik, greedy) and its acc of each task, for `model`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name, text in HARNESS_TASKS.items():
        (folder / f"{name}.yaml").write_text(text.format(path=tasks[name]))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = simple_evaluate(model=model, tasks=list(HARNESS_TASKS), task_manager=manager,
                          num_fewshot=0, limit=IN_TRAINING_LIMIT, log_samples=True,
                          bootstrap_iters=0, random_seed=0)  # fmt: skip
    scores = {}
    for name in HARNESS_TASKS:
        docs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        requests = [tuple(r[0]) for s in docs for r in s["resps"]]
        scores[name] = {"requests": requests, "acc": out["results"][name]["acc,none"]}
        if name == "word_order":
            scores[name]["acc_norm"] = out["results"][name]["acc_norm,none"]
    return scores


def test_lm_eval_harness_parity(trained, tasks, dataset, tmp_path, monkeypatch):
    """lm-evaluation-harness on the same task files: its HF model on our export, and our
    adapter on the checkpoint, both give every request's log-likelihood within 1e-4 of
    `pretrain eval`'s, the same greedy flags and the same accuracies."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.models.huggingface import HFLM

    from pretrain.__main__ import main as pretrain_main
    from pretrain.evals.harness import PretrainLM
    from pretrain.tools.generate import load_model

    last = trained / "checkpoints" / f"step_{STEPS:08d}"
    model, cfg = load_model(last)
    ours = score_here(model, cfg, dataset["tokenizer"])["tasks"]
    assert pretrain_main(["export", str(last), "--hf", str(tmp_path / "hf")]) == 0
    hf = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=8)
    adapter = PretrainLM(str(last), batch_size=8)
    for lm in (hf, adapter):
        theirs = harness_scores(lm, tasks, tmp_path)
        for name, m in ours.items():
            mine = [(s["loglik"], s["greedy"]) for s in m["samples"]]
            assert len(theirs[name]["requests"]) == len(mine) > 0
            for (ll, greedy), (their_ll, their_greedy) in zip(
                mine, theirs[name]["requests"], strict=True
            ):
                assert abs(ll - their_ll) < 1e-4 and greedy == their_greedy, (type(lm), name)
            assert theirs[name]["acc"] == m["acc"]
            assert theirs[name].get("acc_norm") == m.get("acc_norm")


def test_status_sweep_status_plot_and_wandb_show_task_scores(trained, tmp_path):
    from launch.sweep import sweep_status
    from pretrain.tools.plot import plot_runs

    logged = scored(trained)
    r = run_cli("status", str(trained))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("tasks"))
    assert f"core {logged[-1]['eval/core']:.4f} at step 300" in line
    assert f"word_order {logged[-1]['eval/word_order']:.4f}" in line

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": "a", "values": {"lr": 1}}]}))
    (sweep / "a").symlink_to(trained)
    header, row = sweep_status(sweep).splitlines()
    assert row.split()[header.split().index("core")] == f"{logged[-1]['eval/core']:.4f}"

    summary = plot_runs([trained], tmp_path / "p.png")
    (drawn,) = summary.values()
    assert drawn["tasks"]["x"] == [100, 200, 300]
    assert drawn["tasks"]["core"] == [r["eval/core"] for r in logged]
    assert drawn["tasks"]["cloze"] == [r["eval/cloze"] for r in logged]
    assert (tmp_path / "p.png").stat().st_size > 10_000

    # wandb (offline; 0.31 writes protobuf records, and reads them only in its Go core):
    # the resumed run's record file holds the task keys and the last scores as logged.
    data = b"".join(p.read_bytes() for p in (trained / "wandb").glob("offline-run-*/*.wandb"))
    for key in ("eval/core", "eval/word_order/acc_norm", "eval/cloze"):
        assert key.encode() in data
    assert json.dumps(logged[-1]["eval/core"]).encode() in data


@pytest.mark.torchrun
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_training_ranks_score_together(strategy, tiny_overrides, tasks, dataset, tmp_path):
    """Two ranks of a sharded strategy score during training, where every forward gathers
    weights collectively: 7 batches for 2 ranks, so one rank runs a dummy batch (without
    it the other would wait forever), and 8 scored tokens per call of the output
    projection, which ZeRO-3 gathers at every call, so ranks whose batches score different
    numbers of tokens still call it alike. FSDP's scores equal the same checkpoint's scored
    in one plain process, bit for bit. Scores are taken at each checkpoint
    (eval.at_checkpoint)."""
    from pretrain.tools.generate import load_model

    entries = task_entries(tasks, limit=5)  # 5 x 4 choices + 5 = 25 sequences
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/tiny.yaml").read_text()),
                                      "eval": {"tasks": entries, "batch_size": 4}}))  # fmt: skip
    steps = ["train.max_steps=4", "checkpoint.every=2", "eval.every=0", "eval.at_checkpoint=true",
             "parallel.loss_chunk_tokens=8"]  # fmt: skip
    run_torchrun(2, "-m", "pretrain", "train", config, *tiny_overrides, *STRATEGIES[strategy], *steps)  # fmt: skip
    run = tmp_path / "run"
    assert [r["step"] for r in scored(run)] == [2, 4]  # at each checkpoint
    record = scored(run)[-1]
    assert 0 <= record["eval/word_order"] <= 1
    if strategy == "fsdp":  # a DCP checkpoint, which `pretrain eval` reads
        model, cfg = load_model(run / "checkpoints" / "step_00000004")
        here = score_here(model, cfg, dataset["tokenizer"])
        assert here["core"] == record["eval/core"]
        assert here["tasks"]["word_order"]["acc"] == record["eval/word_order/acc"]


def test_a_bad_task_file_is_one_line_before_anything_runs(trained, tasks, tiny_overrides, tmp_path):
    """`pretrain eval` and `pretrain train` name the file, the line and the field, exit 2,
    and training writes nothing: no step, no checkpoint."""
    bad = tmp_path / "bad.jsonl"
    lines = tasks["word_order"].read_text().splitlines()
    wrong = {**json.loads(lines[2]), "gold": 9}
    bad.write_text("\n".join([*lines[:2], json.dumps(wrong), *lines[3:]]) + "\n")
    r = run_cli("eval", str(trained), "--tasks", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"data error: {bad}:3: field 'gold' must be an index into 'choices' (0..3), got 9"
    )
    run = tmp_path / "run"
    task = f"eval.tasks=[{{path: {bad}}}]"
    r = run_cli("train", "configs/tiny.yaml", *with_overrides(tiny_overrides, "eval.every=1", task))
    assert r.returncode == 2 and f"{bad}:3: field 'gold'" in r.stderr.strip().splitlines()[-1]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not [r for r in read_metrics(run) if "loss" in r]
