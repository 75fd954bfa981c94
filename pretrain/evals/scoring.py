"""Scoring requests on the training ranks: tokenized once, cut into fixed global batches,
dealt round-robin to ranks, and reduced on rank 0 into each task's metrics.

Why the numbers do not depend on the world size or the training micro-batch: a request's
log-likelihood comes from a forward over one fixed batch (the same sequences, the same
padded length) whichever rank runs it, and batches are made from every request sorted by
(length, index) in `eval.batch_size` rows, before they are dealt. The ranks sum their
per-request numbers into one table (`merge`); rank 0 computes every metric in example
order. Each rank runs the same number of forwards (one ahead of the others runs a dummy
batch and drops it), each planned for the most scored tokens of its round, so sharded
strategies, whose forward gathers weights collectively (ZeRO-3: at every call of the
output projection), never wait on a rank that has finished or made fewer calls.

Tokenization follows lm-evaluation-harness's HFLM (`_encode_pair`): spaces ending the
context move to the start of the continuation; the continuation's tokens are those of
`context + continuation` after the context's own tokens; an empty context becomes the
end-of-text token; a sequence longer than the model keeps its last max_seq_len + 1 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.errors import DataError
from pretrain.evals.tasks import Request, Task

# forward(inputs (B, T), targets (B, T) with -1 where unscored, planned_tokens) -> (N, 2)
# (logp, greedy); planned_tokens: the most scored tokens any rank has in this forward,
# which sets how often the output projection runs (see `token_scores`).
Forward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Encoded:
    ids: list[int]  # context + continuation, at most max_len + 1 tokens
    n_cont: int  # the last n_cont ids are the continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's HFLM makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def encode(tokenizer, task: Task, requests: list[Request], max_len: int) -> list[Encoded]:
    out = []
    for r in requests:
        ctx, cont = encode_pair(tokenizer, r.context, r.continuation)
        if not cont or len(cont) > max_len:
            raise DataError(
                f"{task.cfg.path}: example {r.example + 1}'s continuation {r.continuation!r} is "
                f"{len(cont)} tokens; it must be 1 to {max_len} (the model's max_seq_len)"
            )
        out.append(Encoded((ctx + cont)[-(max_len + 1) :], len(cont)))
    return out


def batches(encoded: list[Encoded], batch_size: int) -> list[list[int]]:
    """Indices of `encoded` in global batches: longest first (a batch that runs out of
    memory does so at once), ties by index; the same for every world size."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].ids), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def scored_tokens(rows: list[Encoded]) -> int:
    return sum(r.n_cont for r in rows)


@torch.no_grad()
def run_batch(
    forward: Forward, rows: list[Encoded], pad_id: int, device, planned_tokens: int = 0
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each row's continuation, from one forward."""
    width = max(len(r.ids) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        n = len(r.ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, n - r.n_cont : n] = ids[-r.n_cont :]
    scores = forward(inputs.to(device), targets.to(device), planned_tokens).cpu()
    out, at = [], 0
    for r in rows:
        part = scores[at : at + r.n_cont]
        out.append((float(part[:, 0].sum()), bool(part[:, 1].all())))
        at += r.n_cont
    return out


def score(
    forward: Forward,
    encoded: list[Encoded],
    plan: list[list[int]],
    rank: int,
    world: int,
    pad_id: int,
    device,
    beat: Callable[[], None] = lambda: None,
) -> dict[int, tuple[float, bool]]:
    """This rank's share of the batches of `plan`: {request index: (loglik, greedy)}."""
    mine = plan[rank::world]
    rounds = math.ceil(len(plan) / world)
    results: dict[int, tuple[float, bool]] = {}
    for k in range(rounds):
        batch = mine[k] if k < len(mine) else plan[0]  # a dummy: same forwards on every rank
        dealt = plan[k * world : (k + 1) * world]  # what every rank runs in this round
        dealt += [plan[0]] * (world - len(dealt))
        planned = max(scored_tokens([encoded[i] for i in b]) for b in dealt)
        values = run_batch(forward, [encoded[i] for i in batch], pad_id, device, planned)
        if k < len(mine):
            results.update(zip(batch, values, strict=True))
        beat()
    return results


def results_table(mine: dict[int, tuple[float, bool]], n: int) -> torch.Tensor:
    """(n, 2) float64: (loglik, greedy) in the rows of `mine`'s requests, zero elsewhere.
    float64 holds each float32-born loglik exactly, so summing the ranks' tables is exact."""
    table = torch.zeros((n, 2), dtype=torch.float64)
    rows = torch.tensor([[ll, float(g)] for ll, g in mine.values()], dtype=torch.float64)
    table[torch.tensor(list(mine), dtype=torch.long)] = rows.reshape(-1, 2)
    return table


def merge(
    mine: dict[int, tuple[float, bool]], n: int, world: int, device
) -> list[tuple[float, bool]]:
    """Every rank's `score` results, in request order, on every rank: one all-reduce of
    the ranks' `results_table`s, 16 bytes a request, on the communicator the ranks already
    share. (A `gather_object` to rank 0 would, under NCCL, make rank 0 open a connection
    to every other rank, and pickle.)"""
    table = results_table(mine, n)
    if world > 1:
        table = table.to(device)
        dist.all_reduce(table)
    return [(loglik, greedy != 0) for loglik, greedy in table.tolist()]


def task_metrics(task: Task, requests: list[Request], results: list[tuple[float, bool]]) -> dict:
    """acc (and acc_norm for multiple choice), the chance level and the centred score
    (acc - chance) / (1 - chance) of the task's chosen metric, from results in request order."""
    per: dict[int, list[int]] = {}
    for j, r in enumerate(requests):
        per.setdefault(r.example, []).append(j)
    acc = acc_norm = chance = 0.0
    for example, js in per.items():
        if task.type == "language_modeling":
            acc += results[js[0]][1]
            continue
        gold = task.examples[example]["gold"]
        choices = task.examples[example]["choices"]
        ll = [results[j][0] for j in js]
        acc += _argmax(ll) == gold
        acc_norm += _argmax([v / len(c) for v, c in zip(ll, choices, strict=True)]) == gold
        chance += 1 / len(choices)
    n = len(per)
    out = {"acc": acc / n, "n": n}
    if task.type == "multiple_choice":
        out["acc_norm"] = acc_norm / n
    chance /= n
    out["chance"] = chance
    out["centered"] = (out[task.metric] - chance) / (1 - chance)
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy
