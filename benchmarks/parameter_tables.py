"""Print an entry point's parameter table for the docs, from the one definition in config.py.

    python benchmarks/parameter_tables.py register   # paste below `<!-- parameters: register -->`
tests/test_docs.py checks every table in the docs against MLproject, which tests/core/test_config.py
keeps equal to this definition.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table(entry_point: str) -> str:
    from mnist_tracking.cli.main import ENTRY_POINTS
    from mnist_tracking.core.parameters import parameters

    lines = ["| parameter | CLI option | type | default | meaning |", "|---|---|---|---|---|"]
    for p in parameters(ENTRY_POINTS[entry_point][1]):
        default = "(required)" if p.required else f"`{p.default!r}`" if p.default == "" else f"`{p.default}`"
        default = '`""`' if default == "`''`" else default
        meaning = p.help.rstrip(".") + (f"; {p.range.text()}" if p.range else "")
        lines.append(f"| `{p.name}` | `{p.flag}` | {p.mlproject} | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1]), end="")
