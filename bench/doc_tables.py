"""Regenerate the tables in docs/ from the committed bench/results JSON files.

A generated table sits between two markers in a doc:

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

and NAME is one of TABLES below: the JSON it is read from and the function that prints it.

    python bench/doc_tables.py            # rewrite every marked table in docs/ (make tables)
    python bench/doc_tables.py --check    # exit 1, naming each table that differs from its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compression_table  # noqa: E402

MARKED = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _frontier(kind: str) -> Callable[[], str]:
    def make() -> str:
        from frontier_table import table, time_table

        runs = json.loads((ROOT / "bench/results/frontier.json").read_text())["runs"]
        return table(runs) if kind == "bytes" else time_table(runs)

    return make


def _degraded() -> str:
    from degraded_table import table

    return table(json.loads((ROOT / "bench/results/degraded.json").read_text())["runs"])


def _compression(rows: list[str] | None | str) -> Callable[[], str]:
    def make() -> str:
        from compression_table import not_measured, runs_table, throughput_table

        results = json.loads((ROOT / "bench/results/compression.json").read_text())
        if rows == "not-measured":
            return not_measured(results["runs"])
        return throughput_table(results["throughput"]) if rows is None else runs_table(results["runs"], rows)

    return make


def _paper(experiment: str) -> Callable[[], str]:
    def make() -> str:
        import paper_tables

        return getattr(paper_tables, experiment)()

    return make


def _vs_flower(kind: str) -> Callable[[], str]:
    def make() -> str:
        import vs_flower_table

        return getattr(vs_flower_table, kind)(json.loads((ROOT / "bench/results/vs_flower.json").read_text()))

    return make


# name -> (the JSON it comes from, the function that prints it)
TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    **{f"paper-{e.replace('_', '-')}": ("bench/results/suite-paper/", _paper(e))
       for e in ("aggregation", "alpha_sweep", "synchronization", "compression")},
    "compression-classic": ("bench/results/compression.json", _compression(compression_table.CLASSIC)),
    "compression-residual-in-model": ("bench/results/compression.json", _compression(compression_table.RESIDUAL_IN_MODEL)),
    "compression-splits-and-schedules": ("bench/results/compression.json", _compression(compression_table.SPLITS_AND_SCHEDULES)),
    "compression-seeds": ("bench/results/compression.json", _compression(compression_table.SEEDS)),
    "compression-throughput": ("bench/results/compression.json", _compression(None)),
    "compression-not-measured": ("bench/results/compression.json", _compression("not-measured")),
    "frontier-bytes": ("bench/results/frontier.json", _frontier("bytes")),
    "frontier-slow-cloud": ("bench/results/frontier.json", _frontier("time")),
    "degraded": ("bench/results/degraded.json", _degraded),
    **{f"vs-flower-{kind}": ("bench/results/vs_flower.json", _vs_flower(kind)) for kind in ("summary", "full", "compressed")},
}


def regenerate(text: str, where: str) -> tuple[str, list[str]]:
    """`text` with every marked table regenerated, and the names of those that changed."""
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        body = TABLES[name][1]().rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARKED.sub(fill, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = ap.parse_args(argv)
    stale = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        new, changed = regenerate(text, str(doc.relative_to(ROOT)))
        for name in changed:
            stale.append(f"{doc.relative_to(ROOT)}: table {name} differs from {TABLES[name][0]}")
        if changed and not args.check:
            doc.write_text(new)
    for line in stale:
        print(("stale: " if args.check else "rewrote: ") + line)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
