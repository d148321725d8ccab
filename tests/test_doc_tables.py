"""bench/doc_tables.py: the generated tables in docs/ are what their committed JSON files print."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import doc_tables  # noqa: E402


def test_every_marked_table_in_docs_matches_its_json(capsys):
    assert doc_tables.main(["--check"]) == 0, capsys.readouterr().out
    docs = "".join(p.read_text() for p in (doc_tables.ROOT / "docs").glob("*.md"))
    for name in ("frontier-bytes", "paper-aggregation", "paper-synchronization", "compression-classic",
                 "compression-throughput", "vs-flower-full"):
        assert f"<!-- table: {name} -->" in docs


def test_regenerate_rewrites_only_between_markers(monkeypatch):
    monkeypatch.setitem(doc_tables.TABLES, "t", ("x.json", lambda: "| a |\n|---|\n| 1 |"))
    text = "before\n<!-- table: t -->\n| old |\n<!-- /table -->\nafter\n"
    new, changed = doc_tables.regenerate(text, "doc.md")
    assert new == "before\n<!-- table: t -->\n| a |\n|---|\n| 1 |\n<!-- /table -->\nafter\n"
    assert changed == ["t"]
    assert doc_tables.regenerate(new, "doc.md") == (new, [])  # already current
    with pytest.raises(SystemExit, match="doc.md: unknown table 'nope'"):
        doc_tables.regenerate("<!-- table: nope -->\n<!-- /table -->", "doc.md")
