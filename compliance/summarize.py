"""Summarize Autobahn|Testsuite reports (``index.json``) per case category.

Usage: ``python compliance/summarize.py REPORT_DIR``. Prints one line per category
(1 Framing, 2 Pings/Pongs, ... 10 Misc) with the count of each verdict, then every case
that is not acceptable. Exit status 0 only when every case's ``behavior`` and
``behaviorClose`` are OK, NON-STRICT or INFORMATIONAL and at least one case ran.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}
CATEGORIES = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 handling",
    "7": "Close handling",
    "9": "Limits/performance",
    "10": "Misc",
    "12": "permessage-deflate",
    "13": "permessage-deflate",
}


def _key(case_id: str) -> list[int]:
    return [int(part) for part in case_id.split(".")]


def summarize(index: dict[str, dict[str, dict[str, object]]]) -> tuple[list[str], list[str]]:
    """Lines of the per-category table, and the cases that are not acceptable."""
    per_category: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad: list[str] = []
    for agent, cases in index.items():
        for case_id in sorted(cases, key=_key):
            result = cases[case_id]
            behavior, close = str(result["behavior"]), str(result["behaviorClose"])
            verdict = behavior if behavior != "OK" else close  # the worse of the two, roughly
            per_category[case_id.split(".")[0]][verdict] += 1
            if behavior not in ACCEPTABLE or close not in ACCEPTABLE:
                bad.append(f"{agent} {case_id}: behavior={behavior} behaviorClose={close}")
    lines = []
    for category in sorted(per_category, key=int):
        counts = per_category[category]
        detail = ", ".join(f"{verdict} {n}" for verdict, n in sorted(counts.items()))
        lines.append(f"{category:>3} {CATEGORIES.get(category, '?'):<20} {sum(counts.values()):>4} cases: {detail}")
    return lines, bad


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: summarize.py REPORT_DIR", file=sys.stderr)
        return 2
    path = Path(argv[1]) / "index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"summarize: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    lines, bad = summarize(index)
    print("\n".join(lines))
    for line in bad:
        print(f"NOT ACCEPTABLE {line}")
    if not lines:
        print("summarize: no cases ran", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
