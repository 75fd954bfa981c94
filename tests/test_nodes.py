"""Four nodes on one machine: `pretrain launch --nnodes 4` agents x 2 ranks, each agent in
namespaces of its own (hostname, /dev/shm, node-local scratch, PID namespace: see
tests/helpers/nodes.py), sharing the run directory and training from zstd shards on the loopback
S3 server, with real kill -9 of whole nodes.

- 8 ranks (FSDP) train to the losses of 2 ranks with the same global batch;
- a node killed mid-run and started again: the job ends with the uninterrupted losses, bit
  for bit (the other agents restart their workers; all resume from the last checkpoint);
- a node killed for good under `--nnodes 3:4`: the survivors go on with 6 ranks at the
  same global batch and sample order, with no person and no resubmission;
- the work that must not grow with the cluster stays O(1) per rank (issue 12, items 1, 2,
  8, 9, 11), counted with pretrain/iotrace.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from pathlib import Path
from unittest.mock import ANY

import pytest

from pretrain import iotrace
from pretrain.train.metrics import read_metrics
from tests.helpers.nodes import Cluster, address, available
from tests.helpers.runs import TINY_MODEL, losses_by_step, run_cli, run_torchrun

pytestmark = [pytest.mark.nodes, pytest.mark.torchrun]

NODES, RANKS_PER_NODE, STEPS = 4, 2, 12
# FSDP, as at scale. (DDP is not bit for bit across a restart on 3 or more ranks: the first
# step of every start all-reduces its gradient bucket in parameter order, later steps in
# the order backward produced them, and a ring all-reduce then adds some of the ranks'
# values in another order. Two ranks add the same two numbers either way.)
STRATEGY = "fsdp"
GLOBAL_BATCH = 24  # divisible by 8 ranks and by 6 (3 nodes) x micro-batch 1
# The sample order of every run here: what a run started with `--nnodes 3:4` chooses by
# itself (lcm(3, 4), see pretrain/data_order.py); given explicitly to the others (a fixed
# 4-node job would choose 4, a 1-node job 1), so that all have the same global batches.
CANONICAL_NODES = 12
# Short rendezvous timeouts: a dead node is dropped after 3 x 1 s without a heartbeat, and a
# 3:4 job waits 5 s for a fourth node once three are there (torchrun: 15 s and 30 s).
RDZV_CONF = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=300"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scale_data(s3_server, dataset) -> str:
    """The session corpus as small zstd shards in the S3 server (several shards per rank)."""
    url = f"s3://{s3_server.make_bucket('pretrain-scale')}/plays"
    r = run_cli(
        "prep", "shards", "--inputs", str(dataset["corpus"]), "--text-field", "body",
        "--tokenizer", str(dataset["tokenizer"]), "--seq-len", "64", "--val-fraction", "0.1",
        "--out", url, "--compression", "zstd", "--shard-size-limit", "32KB", env=s3_server.env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return url


def scale_overrides(
    dataset: dict, url: str, run_dir: Path, canonical: int | None = CANONICAL_NODES
) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.tokenizer={dataset['tokenizer']}",
        f"data.streams=[{{path: {url}}}]",
        *([f"data.num_canonical_nodes={canonical}"] if canonical else []),
        *TINY_MODEL,
        f"train.global_batch_size={GLOBAL_BATCH}",
        "train.micro_batch_size=1",
        f"train.max_steps={STEPS}",
        f"train.eval_every={STEPS}",
        "train.eval_batches=2",
        "train.log_every=1",
        "schedule.warmup_steps=3",
        f"schedule.decay_steps={STEPS}",
        "checkpoint.every=3",
        "checkpoint.keep_last=2",
        "optim.lr=3e-3",
        f"parallel.strategy={STRATEGY}",
        "parallel.threads=1",
    ]


class Job:
    """One multi-node job: its cluster, run directory, trace folder and launch arguments."""

    def __init__(
        self, root: Path, s3_server, dataset, url: str, nnodes: str, canonical: int | None
    ) -> None:
        self.run = root / "run"
        self.trace = root / "trace"
        self.trace.mkdir(parents=True)
        self.cluster = Cluster(
            root / "nodes", NODES, env={**s3_server.env, iotrace.ENV: str(self.trace)}
        )
        self.port = _free_port()
        self.nnodes = nnodes
        self.overrides = scale_overrides(dataset, url, self.run, canonical)
        self.started = time.time()
        self.wall_s = 0.0

    def start(self, node: int, env: dict | None = None) -> None:
        # node0 hosts the rendezvous store, as the first node of a SLURM job does (losing
        # that node ends the job: then only a requeue brings it back).
        host = "is_host=1" if node == 0 else "is_host=0"
        self.cluster[node].start(
            "configs/tiny.yaml", *self.overrides, f"--nnodes={self.nnodes}",
            f"--nproc-per-node={RANKS_PER_NODE}", f"--node-rank={node}", "--max-restarts=3",
            f"--rdzv-endpoint={address(0)}:{self.port}", "--rdzv-id=scale",
            f"--rdzv-conf={RDZV_CONF},{host}", env=env,
        )  # fmt: skip

    def start_all(self, env: dict | None = None) -> None:
        for node in range(NODES):
            self.start(node, env)

    def finish(self, timeout: float = 300) -> None:
        """Wait for every running node to end, each with exit 0."""
        running = [n for n in self.cluster.nodes if n.running()]
        try:
            codes = self.cluster.wait(timeout, running)
        finally:
            self.cluster.stop()
        self.wall_s = time.time() - self.started
        assert codes == [0] * len(running), f"exit codes {codes}\n{self.cluster.logs()}"

    def logged_step(self) -> int:
        return max((r["step"] for r in read_metrics(self.run) if "loss" in r), default=0)

    def kill_after_step(self, step: int, node: int, timeout: float = 300) -> None:
        """kill -9 the whole of `node` once `step` is logged."""
        deadline = time.time() + timeout
        while self.logged_step() < step:
            assert time.time() < deadline, f"no step {step} in {timeout} s\n{self.cluster.logs()}"
            assert self.cluster[node].running(), f"node{node} ended\n{self.cluster.logs()}"
            time.sleep(0.05)
        self.cluster[node].kill()

    def starts(self) -> list[str]:
        """'A micro-batches/step x W ranks | from step S' of each start of the workers."""
        found = []
        for out in self.run.glob("logs/*/attempt*.rank0.out"):
            for line in out.read_text().splitlines():
                if "micro-batches/step" in line:
                    found.append((out.stat().st_mtime, " | ".join(line.split(" | ")[-2:])))
        return [line for _, line in sorted(found)]

    def records(self) -> list[dict]:
        return iotrace.read(self.trace)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, s3_server, dataset, scale_data) -> Job:
    """The 8-rank job, run once without faults: the reference of the other tests."""
    if why := available():
        pytest.skip(why)
    job = Job(
        tmp_path_factory.mktemp("uninterrupted"), s3_server, dataset, scale_data, "4",
        CANONICAL_NODES,
    )  # fmt: skip
    job.start_all()
    job.finish()
    print(f"\nuninterrupted 8-rank job: {job.wall_s:.1f} s")
    return job


# Every step takes 0.4 s more (a sleep: numerics unchanged), so a node can be killed mid-run.
PACED = {"PRETRAIN_FAULTS": "steptime@0.4"}


@pytest.fixture(scope="module")
def node_restarted(tmp_path_factory, s3_server, dataset, scale_data) -> Job:
    """kill -9 of node3 after step 4, then its agent started again (as SLURM restarts a
    job step); the other agents restart their workers and wait for it."""
    if why := available():
        pytest.skip(why)
    job = Job(
        tmp_path_factory.mktemp("restarted"), s3_server, dataset, scale_data, "4", CANONICAL_NODES
    )
    job.start_all(PACED)
    job.kill_after_step(4, node=3)
    job.start(3, PACED)
    job.finish()
    print(f"\nnode killed and started again: {job.wall_s:.1f} s")
    return job


@pytest.fixture(scope="module")
def node_lost(tmp_path_factory, s3_server, dataset, scale_data) -> Job:
    """`--nnodes 3:4`, kill -9 of node3 after step 4, nothing started again; the sample
    order is left to the run to choose for 3 to 4 nodes."""
    if why := available():
        pytest.skip(why)
    job = Job(tmp_path_factory.mktemp("lost"), s3_server, dataset, scale_data, "3:4", None)
    job.start_all(PACED)
    job.kill_after_step(4, node=3)
    job.finish()
    print(f"\nnode lost for good: {job.wall_s:.1f} s")
    return job


def test_eight_ranks_on_four_nodes_train_like_two_ranks(
    uninterrupted, tmp_path, s3_server, dataset, scale_data
):
    """The same global batch on 2 ranks (12 micro-batches each) and on 8 ranks on four
    nodes (3 each): the same samples in each step, so the same losses up to float sums."""
    eight = losses_by_step(uninterrupted.run)
    assert sorted(eight) == list(range(1, STEPS + 1))
    assert uninterrupted.starts()[-1] == "3 micro-batches/step x 8 ranks | from step 0"
    two = tmp_path / "two"
    run_torchrun(2, "-m", "pretrain", "train", "configs/tiny.yaml",
                 *scale_overrides(dataset, scale_data, two), env=s3_server.env)  # fmt: skip
    assert losses_by_step(two) == pytest.approx(eight, rel=1e-5)


def test_a_node_killed_and_started_again_ends_bit_for_bit(node_restarted, uninterrupted):
    """The other nodes' agents restart their workers, the restarted node joins them, and
    all 8 ranks resume from the last checkpoint: every loss is the uninterrupted one."""
    job = node_restarted
    assert losses_by_step(job.run) == losses_by_step(uninterrupted.run)
    starts = job.starts()
    assert starts[0] == "3 micro-batches/step x 8 ranks | from step 0", starts
    assert starts[-1] in {f"3 micro-batches/step x 8 ranks | from step {s}" for s in (3, 6)}
    status = run_cli("status", str(job.run)).stdout
    assert "state       finished (last exit 0)" in status, status


def test_a_node_lost_for_good_the_others_go_on_with_three(node_lost, uninterrupted):
    """`--nnodes 3:4`: the survivors restart their workers without node3, 6 ranks at the
    same global batch (4 micro-batches each instead of 3) and the same sample order; no
    person, no resubmission."""
    job = node_lost
    starts = job.starts()
    # (a fourth node later than last_call_timeout joins at a restart, so 8 ranks need not
    # be the very first start)
    assert any(start.startswith("3 micro-batches/step x 8 ranks") for start in starts), starts
    assert starts[-1] in {f"4 micro-batches/step x 6 ranks | from step {s}" for s in (3, 6)}
    order = json.loads((job.run / "data_order.json").read_text())
    assert order == {"num_canonical_nodes": CANONICAL_NODES, "chosen": ANY}
    assert "3..4" in order["chosen"], order  # from PRETRAIN_NNODES_RANGE=3:4
    ref = losses_by_step(uninterrupted.run)
    assert losses_by_step(job.run) == pytest.approx(ref, rel=1e-5)


def test_every_node_records_its_launch_and_exit(uninterrupted, node_restarted):
    """The four agents append to one launches.jsonl at the same moments: every line whole;
    `pretrain status` reads it."""
    for job, launches in ((uninterrupted, 4), (node_restarted, 5)):
        lines = (job.run / "launches.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]  # each line one whole record
        assert sorted(r["host"] for r in records if r["event"] == "launch") == sorted(
            [f"node{i}" for i in range(NODES)] + ["node3"] * (launches - NODES)
        )
        exits = [r for r in records if r["event"] == "exit"]
        assert sorted(r["host"] for r in exits) == [f"node{i}" for i in range(NODES)]
        assert {r["exit_code"] for r in exits} == {0}
    status = run_cli("status", str(uninterrupted.run)).stdout
    assert "state       finished (last exit 0)" in status, status


# Issue 12: the work whose count must not grow with the cluster (pretrain/iotrace.py).


def _owner(path: str) -> int | None:
    """The rank whose checkpoint file `path` is (None: a file of the whole checkpoint)."""
    match = re.search(r"__(\d+)_\d+\.distcp$|rank(\d+)\.\w+$", path)
    return int(match.group(1) or match.group(2)) if match else None


def _commit(path: str) -> int | None:
    match = re.search(r"step_(\d+)", path)
    return int(match.group(1)) if match else None


def test_item1_only_rank_0_checks_the_data(uninterrupted, node_restarted, s3_server):
    """Item 1: on each start, global rank 0 alone hashes shards or lists the dataset, once
    (not every rank, not once per shard per rank)."""
    listing = s3_server.client().list_objects_v2(Bucket="pretrain-scale", Prefix="plays/")
    shards = [o["Key"] for o in listing["Contents"] if ".mds" in o["Key"]]
    for job in (uninterrupted, node_restarted):
        records = [r for r in job.records() if r["kind"] in (iotrace.HASH, iotrace.LIST)]
        assert {r["rank"] for r in records} == {0}, Counter(r["rank"] for r in records)
        per_start = Counter((r["host"], r["pid"], r["kind"]) for r in records)
        assert max(n for (_, _, kind), n in per_start.items() if kind == iotrace.LIST) <= 4
        hashes = [n for (_, _, kind), n in per_start.items() if kind == iotrace.HASH]
        assert max(hashes, default=0) <= len(shards), per_start


def test_item2_each_node_caches_shards_in_its_own_scratch(uninterrupted):
    """Item 2: streaming's cache is node-local (run.scratch / $PRETRAIN_SCRATCH), not in the
    shared run directory where four nodes would download into one folder."""
    assert not list(uninterrupted.run.rglob("shard.*.mds*")), "shards in the shared run dir"
    for node in uninterrupted.cluster.nodes:
        assert list(node.scratch.rglob("shard.*.mds")), f"no shard in {node.name}'s scratch"


def test_item8_each_rank_syncs_only_its_own_checkpoint_files(uninterrupted, node_lost):
    """Item 8: at each checkpoint commit every rank fsyncs (and sizes) only the files it
    wrote; rank 0 adds the checkpoint's own few files. Nothing grows with the ranks."""
    for job in (uninterrupted, node_lost):
        records = [
            r for r in job.records()
            if r["kind"] in (iotrace.FSYNC, iotrace.STAT) and _commit(r["what"]) is not None
        ]  # fmt: skip
        commits = [r for r in records if ".tmp-step_" in r["what"]]
        assert commits, "no checkpoint commit traced"
        for r in commits:
            assert _owner(r["what"]) in ({r["rank"], None} if r["rank"] == 0 else {r["rank"]}), r
        fsyncs = Counter((r["rank"], _commit(r["what"])) for r in commits if r["kind"] == "fsync")
        assert max(n for (rank, _), n in fsyncs.items() if rank != 0) <= 4, fsyncs
        assert max(n for (rank, _), n in fsyncs.items() if rank == 0) <= 12, fsyncs


def test_item9_only_rank_0_chooses_the_checkpoint_to_resume(node_restarted, node_lost):
    """Item 9: after a restart rank 0 alone looks at the checkpoints (stat of each file
    against the manifest) and tells the others which one to load."""
    for job in (node_restarted, node_lost):
        stats = [r for r in job.records() if r["kind"] == iotrace.STAT]
        committed = [r for r in stats if re.search(r"/step_\d+/", r["what"])]
        assert committed, "the resume checked no checkpoint"
        assert {r["rank"] for r in committed} == {0}, Counter(r["rank"] for r in committed)
        for r in stats:  # and no other rank sizes another rank's file
            assert r["rank"] == 0 or _owner(r["what"]) == r["rank"], r


# DataLoader workers bind AF_UNIX sockets in TMPDIR: 108 bytes for the whole path, of
# which multiprocessing's own names take about 35.
MAX_TMPDIR = 70


def test_item11_ranks_temp_folder_is_node_local_and_short(uninterrupted):
    """Item 11: TMPDIR of the ranks (streaming's lock files, compile caches) is in the
    node's scratch, short enough for sockets, and nothing of it is in the run directory."""
    assert not (uninterrupted.run / "tmp").exists()
    cluster = uninterrupted.cluster
    for node in cluster.nodes:
        locks = list(node.scratch.rglob("*_filelock"))
        assert locks, f"no streaming lock file in {node.name}'s scratch"
        for lock in locks:
            tmpdir = cluster.scratch / lock.parent.relative_to(node.scratch)  # as the node sees it
            assert len(str(tmpdir)) <= MAX_TMPDIR, tmpdir
