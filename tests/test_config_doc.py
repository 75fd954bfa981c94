"""The config reference (docs/config.md) is generated from the schema and kept current."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from pretrain.config import doc as config_doc
from pretrain.config.schema import CHOICES, Config
from tests.helpers.runs import REPO

STALE = config_doc.STALE


def _accepted_keys(node: DictConfig, prefix: str) -> list[str]:
    """Every key the loader accepts, walked from OmegaConf's view of the schema."""
    keys = []
    for name in node:
        key, value = f"{prefix}{name}", node._get_node(name)
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            keys += _accepted_keys(value, key + ".")
            continue
        keys.append(key)  # a leaf, a free-form dict or a list
        element = value._metadata.element_type if isinstance(value, ListConfig) else None
        if dataclasses.is_dataclass(element):
            keys += _accepted_keys(OmegaConf.structured(element), key + "[].")
    return keys


def _unquote(cell: str) -> str:
    cell = cell.strip().replace("\\|", "|")
    return cell[1:-1] if len(cell) > 1 and cell[0] == cell[-1] == "`" else cell


@pytest.fixture(scope="module")
def markdown() -> str:
    return config_doc.reference_markdown()


@pytest.fixture(scope="module")
def rows(markdown) -> list[tuple[str, str, str, str]]:
    out = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            assert len(cells) == 4, line
            out.append(tuple(_unquote(c) for c in cells))
    return out


@pytest.fixture(scope="module")
def table(rows) -> dict[str, tuple[str, str, str]]:
    return {key: tuple(rest) for key, *rest in rows}


def test_every_accepted_key_appears_exactly_once(rows):
    expected = _accepted_keys(OmegaConf.structured(Config), "")
    counts = Counter(key for key, *_ in rows)
    assert {k for k, n in counts.items() if n > 1} == set()
    assert set(counts) == set(expected)
    assert "data.streams[].path" in counts and "optim.lr" in counts


def test_one_section_per_top_level_field_in_order(markdown):
    headings = re.findall(r"^### (\w+)$", markdown, flags=re.M)
    assert headings == [f.name for f in dataclasses.fields(Config)]
    assert markdown == config_doc.reference_markdown()  # deterministic


def test_types_and_defaults_match_the_schema(table):
    assert table["optim.lr"][:2] == ("float", "0.0003")
    assert table["fault.requeue_exit_code"][:2] == ("int", "75")
    assert table["run.dir"][:2] == ("str", "runs/${run.name}")
    assert table["model.n_kv_heads"][:2] == ("int | None", "None")
    assert table["data.tokenizer"][1] == "required"
    assert table["fault.preempt_signals"][:2] == ("list[str]", "[SIGTERM, SIGUSR1, SIGUSR2]")
    assert table["parallel.deepspeed"][:2] == ("dict", "{}")
    assert table["data.shuffle"][:2] == ("bool", "true")


def test_keys_with_choices_list_them(table):
    assert table["parallel.strategy"][2].endswith("One of: single, ddp, fsdp, zero.")
    for key, choices in CHOICES.items():
        assert f"One of: {', '.join(map(str, choices))}." in table[key][2], key


def test_comment_above_a_field_is_its_meaning(table):
    assert table["data.tokenizer"][2] == "sentencepiece model from `pretrain prep tokenizer`."
    meaning = table["data.skip_bad_shards"][2]  # a two-line comment, joined
    assert meaning == (
        "Leave out shards found missing, truncated or corrupt at start-up (with a warning) "
        "instead of refusing to start."
    )


@dataclass
class _Example:
    # Above a.
    a: int = 1  # and trailing.

    b: str = "x # not a comment"
    # Above c, line one;
    # line two | with a pipe.
    c: list[int] = field(
        default_factory=lambda: [1, 2],  # inside the call
    )

    @property
    def d(self) -> int:
        a: int = 2  # not a field
        return a


def test_field_comments_extraction():
    assert config_doc.field_comments(_Example) == {
        "a": "Above a. and trailing.",
        "b": "",
        "c": "Above c, line one; line two | with a pipe. inside the call",
    }


def test_docs_page_block_is_current():
    page = REPO / "docs" / "config.md"
    assert page == config_doc.PAGE  # what `--update` rewrites is the page users read
    text = page.read_text(encoding="utf-8")
    assert config_doc.START in text and config_doc.END in text, (
        f"{page} has no {config_doc.START} ... {config_doc.END} markers; {STALE}"
    )
    assert config_doc.check_page(page), STALE
    assert config_doc.main(["--check"]) == 0


def test_update_page_rewrites_only_the_block(tmp_path):
    page = tmp_path / "config.md"
    page.write_text(f"# Title\n\nbefore\n{config_doc.START}\nold\n{config_doc.END}\nafter\n")
    assert not config_doc.check_page(page)
    assert config_doc.update_page(page) is True
    assert config_doc.check_page(page)
    text = page.read_text()
    assert text.startswith(f"# Title\n\nbefore\n{config_doc.START}\n")
    assert text.endswith(f"{config_doc.END}\nafter\n")
    assert config_doc.update_page(page) is False  # idempotent
    page.write_text("no markers\n")
    assert not config_doc.check_page(page)
    with pytest.raises(ValueError, match="markers"):
        config_doc.update_page(page)


def test_main_prints_the_reference(capsys, markdown):
    assert config_doc.main([]) == 0
    assert capsys.readouterr().out == markdown
    assert config_doc.main(["--bogus"]) == 2
