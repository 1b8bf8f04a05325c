"""The slowest test files and tests of a pytest run, as the Markdown tables of docs/development.md.

    python -m pytest --junitxml=run.xml ...        # the run to read (every test's seconds: setup, call, teardown)
    python benchmarks/test_durations.py run.xml [--top 30]

Seconds are summed per file: with two workers the wall time is about half the sum, plus the start.
"""

from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def read(path: str) -> list[tuple[str, str, float]]:
    """(file, test, seconds) of every test case of a JUnit XML report."""
    cases = []
    for case in ET.parse(path).iter("testcase"):
        module = case.get("classname", "")
        cases.append((module.replace(".", "/") + ".py", case.get("name", ""), float(case.get("time", 0))))
    return cases


def tables(cases: list[tuple[str, str, float]], top: int) -> str:
    per_file: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for file, _, seconds in cases:
        per_file[file] += seconds
        count[file] += 1
    lines = [f"{len(cases)} tests, {sum(per_file.values()):.0f} s in all", "",
             "| file | tests | seconds |", "|---|---:|---:|"]
    lines += [f"| `{file}` | {count[file]} | {seconds:.0f} |" for file, seconds in
              sorted(per_file.items(), key=lambda item: -item[1])[:top]]
    lines += ["", "| test | seconds |", "|---|---:|"]
    slowest = sorted(cases, key=lambda case: -case[2])[:top]
    lines += [f"| `{file.rsplit('/', 1)[-1]}::{name[:90]}` | {seconds:.1f} |" for file, name, seconds in slowest]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(tables(read(args.report), args.top))


if __name__ == "__main__":
    main()
