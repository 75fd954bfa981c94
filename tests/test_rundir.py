"""The run directory's files are named in pretrain/rundir.py alone, and an atomic write
leaves the old file or the new one, never a part of it nor a temporary beside it."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from pretrain import files, rundir
from tests.helpers.runs import REPO

SCANNED = ("pretrain", "launch", "data_prep", "bench")


def rundir_names() -> dict[str, re.Pattern]:
    """Every file name rundir.py defines, as a pattern: a `{field}` matches anything."""
    file = type(rundir.RunDir.config)
    names = [v for k, v in vars(rundir).items() if k.isupper() and isinstance(v, str)]
    for folder in (rundir.RunDir, rundir.SweepDir):
        names += [v.name for v in vars(folder).values() if isinstance(v, file)]
    return {
        name: re.compile("^" + ".*".join(map(re.escape, re.split(r"\{\w*\}", name))) + "$")
        for name in names
    }


def path_like_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string that could be a path: f-strings with `{}` for their
    fields; docstrings and prose (anything with a space) left out."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docstrings.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings | parts:
                continue
            text = node.value
        else:
            continue
        if not any(c.isspace() for c in text):
            out.append((node.lineno, text))
    return out


def test_only_rundir_spells_a_run_directory_file_name():
    names = rundir_names()
    assert {"config.yaml", "checkpoints", "launch.json", ".lock", "sweep.json"} <= set(names)
    assert "attempt{attempt}.rank{rank}.{kind}" in names
    found = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "pretrain" / "rundir.py":
                continue
            for line, text in path_like_strings(ast.parse(path.read_text())):
                for part in text.split("/"):
                    hits = [name for name, pattern in names.items() if pattern.match(part)]
                    if hits:
                        found.append(f"{path.relative_to(REPO)}:{line}: {text!r} is {hits[0]}")
    assert not found, "use pretrain.rundir instead:\n" + "\n".join(found)


def test_the_scan_finds_a_spelled_name():
    tree = ast.parse(
        'p = run_dir / "metrics.jsonl"\nq = f"{d}/logs/x"\nr = f".launch-node{n}.lock"'
    )
    names = rundir_names()
    parts = [part for _, text in path_like_strings(tree) for part in text.split("/")]
    assert {"metrics.jsonl", "logs", ".launch-node{}.lock"} <= set(parts)
    assert all(any(p.match(part) for p in names.values()) for part in parts if part not in "{}x")


def test_an_atomic_write_that_fails_midway_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "state.json"
    files.write_json(path, {"step": 1})

    def disk_full(fd: int) -> None:  # after the temporary file was opened and written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        files.write_json(path, {"step": 2})
    with pytest.raises(RuntimeError), files.atomic_open(path, durable=False) as f:
        f.write(b'{"step": 3, "par')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    monkeypatch.undo()
    files.write_atomic(path, '{"step": 4}')
    assert json.loads(path.read_text()) == {"step": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_run_directory_is_named_by_its_paths(tmp_path: Path):
    run = rundir.RunDir(tmp_path)
    assert run.config == tmp_path / "config.yaml" and run.lock == tmp_path / ".lock"
    assert run.node_lock(3) == tmp_path / ".launch-node3.lock"
    assert run.rank_log("L", 1, 5, "err") == tmp_path / "logs" / "L" / "attempt1.rank5.err"
    assert run.data_fingerprints("val") == tmp_path / "data_val.json"
    step = run.checkpoints / "step_00000010"
    assert rundir.RunDir.of_checkpoint(step).path == tmp_path
    assert not run.has_checkpoint() and run.recorded_data_order() is None
    step.mkdir(parents=True)
    run.record_data_order(4, "for 4 node(s)")
    assert run.has_checkpoint() and run.recorded_data_order() == 4
    assert run.complete_checkpoints() == []  # no manifest: not complete
