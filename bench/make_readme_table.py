"""Print the headline benchmark table from bench/results/cpu.json, or write it into README.md.

Usage: ``python bench/make_readme_table.py [RESULTS.json] [--write README.md]``. With
``--write`` the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from gpumlp.bench.report import headline_markdown

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def replace_between_markers(text: str, body: str) -> str:
    """Return ``text`` with everything between the bench markers replaced by ``body``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {START} ... {END} not found")
    return pattern.sub(lambda _: f"{START}\n{body.strip()}\n{END}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table, or splice it into a README between the markers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", type=Path, default=ROOT / "bench" / "results" / "cpu.json")
    p.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    made = (
        f"_From `{args.results.name}`, {res.get('created', '')}; regenerate with `gpumlp bench --json ...`._"
    )
    body = f"{headline_markdown(res)}\n{made}\n"
    if not args.write:
        print(body)
        return 0
    try:
        args.write.write_text(replace_between_markers(args.write.read_text(), body))
    except ValueError as e:
        print(f"{args.write}: {e}", file=sys.stderr)
        return 1
    print(f"updated {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
