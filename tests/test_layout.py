"""The layout stays true (DESIGN.md "Layers"): who may import whom, read from every module's source.

- ``data`` imports nothing of causalrec's but ``errors`` and ``io``;
- ``llm`` imports no RecBole, no TRL trainer, nothing of ``training``/``recbole``/``experiments``;
- ``training`` imports no RecBole and nothing of ``recbole``/``experiments``; of ``data`` only ``data.prompts``;
- only ``causalrec.recbole`` imports ``recbole``;
- nothing imports ``causalrec.cli`` but the CLI itself and ``__main__``;
- no module reaches into another package's private names (``from causalrec.x import _y``);
- a module over 500 lines says why in its docstring.
And ``causalrec.data``, ``causalrec.llm`` and ``causalrec.training`` import with RecBole made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "causalrec"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in the file, at any depth (lazy imports inside functions count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "causalrec" and len(parts) > 1 else parts[0]


def _allowed(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (None: allowed)."""
    top = imported.split(".")[0]
    own = _package(importer)
    if top == "recbole" and not importer.startswith("causalrec.recbole"):
        return "only causalrec.recbole imports RecBole"
    if imported.startswith("causalrec.cli") and not (
        importer.startswith("causalrec.cli") or importer == "causalrec.__main__"
    ):
        return "nothing imports the CLI"
    if not imported.startswith("causalrec.") or _package(imported) == own:
        return None
    target = _package(imported)
    if own == "causalrec.data" and target not in ("causalrec.errors", "causalrec.io"):
        return "data imports only errors and io"
    if own == "causalrec.llm" and target in ("causalrec.training", "causalrec.recbole", "causalrec.experiments"):
        return "llm knows no training, RecBole adapter or experiments"
    if own == "causalrec.training":
        if target in ("causalrec.recbole", "causalrec.experiments"):
            return "training knows no RecBole adapter or experiments"
        if target == "causalrec.data" and imported != "causalrec.data.prompts":
            return "training uses data.prompts only"
    return None


def test_import_rule():
    broken = []
    for name, path in _modules().items():
        for imported, names in _imports(path):
            why = _allowed(name, imported)
            if why:
                broken.append(f"{name} imports {imported}: {why}")
            if imported.startswith("causalrec.") and _package(imported) != _package(name):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    broken.append(f"{name} imports private {private} from {imported}")
            if (
                name.startswith("causalrec.llm")
                and imported.startswith("trl")
                and any(n.endswith("Trainer") for n in names)
            ):
                broken.append(f"{name} imports a TRL trainer")
    assert not broken, "\n".join(broken)


def test_long_modules_say_why():
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and "Why this module is long" not in doc:
            long.append(f"{name}: {lines} lines")
    assert not long, "modules over 500 lines without 'Why this module is long' in the docstring: " + ", ".join(long)


@pytest.mark.parametrize("package", ["causalrec.data", "causalrec.llm", "causalrec.training"])
def test_layers_import_without_recbole(package):
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "recbole" or name.startswith("recbole."):
            raise ImportError("recbole is blocked for this test")
sys.meta_path.insert(0, Block())
import {package}
import causalrec.io, causalrec.errors
assert not [m for m in sys.modules if m == "recbole" or m.startswith(("recbole.", "causalrec.recbole"))], sorted(sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_causalrec_registers_with_recbole():
    code = """
import causalrec
from recbole.utils import get_model, get_trainer
from recbole.utils import ModelType
assert get_model("CausalDPO").__module__ == "causalrec.recbole.models.causaldpo"
assert get_trainer(ModelType.SEQUENTIAL, "CausalDPO").__name__ == "LLMTrainer"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_readme_layout_map_is_generated_from_the_code():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    try:
        import layout_map
    finally:
        sys.path.pop(0)
    assert layout_map.layout_map() in (root / "README.md").read_text(encoding="utf-8"), (
        "README's layout map is stale: run .venv/bin/python scripts/layout_map.py --write"
    )
