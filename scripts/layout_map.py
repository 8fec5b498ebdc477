"""Print the README's "Layout" map from the code: each package and module with the first line of its docstring.

    .venv/bin/python scripts/layout_map.py            # print it
    .venv/bin/python scripts/layout_map.py --write    # replace the map between the README's layout markers

``tests/test_layout.py`` holds the README equal to this output, so the map cannot drift from the code.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "causalrec"
START, END = "<!-- layout:start (scripts/layout_map.py) -->", "<!-- layout:end -->"
# Layers in the order data flows (DESIGN.md); anything else after them.
ORDER = ["errors.py", "io.py", "allocator.py", "data", "llm", "training", "recbole", "experiments", "cli"]


def _first_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0]


def _entries(folder: Path, depth: int) -> list[str]:
    lines = []
    names = sorted(
        p.name
        for p in folder.iterdir()
        if not p.name.startswith((".", "__")) and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
    )
    if depth == 0:
        names = sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    for name in names:
        path = folder / name
        indent = "  " * depth
        if path.is_dir():
            lines.append(f"{indent}- `{name}/`: {_first_line(path / '__init__.py')}")
            lines += _entries(path, depth + 1)
        else:
            lines.append(f"{indent}- `{name}`: {_first_line(path)}")
    return lines


def layout_map() -> str:
    return "\n".join([START, "", *_entries(PACKAGE, 0), "", END])


def main(argv: list[str]) -> int:
    text = layout_map()
    if "--write" not in argv:
        print(text)
        return 0
    readme = ROOT / "README.md"
    content = readme.read_text(encoding="utf-8")
    if START not in content:
        raise SystemExit(f"README.md has no {START!r} marker")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + text + tail, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
