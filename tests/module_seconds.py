"""Seconds each test module took in a full run, for ordering the modules longest first.

    python tests/module_seconds.py LOG     # LOG: the output of `pytest --durations=0 ...`

reads the `--durations` lines of LOG ("12.34s call     tests/test_x.py::test_y"), adds
them up per module and writes tests/module_seconds.json. conftest.py hands the modules to
pytest-xdist in that order (longest first: the longest-processing-time rule), so a long
module does not start last and run alone at the end of the suite.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).with_name("module_seconds.json")
LINE = re.compile(r"^(?P<s>\d+(?:\.\d+)?)s\s+(?:call|setup|teardown)\s+(?P<module>tests/[^:\s]+\.py)::")


def module_seconds(log: str) -> dict[str, float]:
    """Seconds per module file name, from pytest's --durations lines."""
    total: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        m = LINE.match(line.strip())
        if m is not None:
            total[Path(m["module"]).name] += float(m["s"])
    return {k: round(v, 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/module_seconds.py PYTEST_LOG")
    seconds = module_seconds(Path(sys.argv[1]).read_text())
    if not seconds:
        raise SystemExit(f"{sys.argv[1]}: no --durations lines (run pytest with --durations=0)")
    OUT.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"wrote {OUT} ({len(seconds)} modules)")


if __name__ == "__main__":
    main()
