"""The stages in layers: the core (src/scdino) imports no stage; the engine may import export's primitives; export
and training import only the core; the API (api/, scdino.api) sits above them all; and every import of another stage is
at the top of its module, where readers and tools see it. The one exception is the package's front door:
``scdino/__init__.py`` reaches the API lazily (``scdino.embed`` ...), so that ``import scdino`` stays light. Read from
the source with ast (a module-level import and one inside a function alike)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "core": ROOT / "src" / "scdino",
    "engine": ROOT / "engine",
    "export": ROOT / "export",
    "training": ROOT / "training",
    "api": ROOT / "api",
}
ALLOWED = {
    "core": set(),
    "engine": {"export"},
    "export": set(),
    "training": set(),
    "api": {"engine", "export", "training"},
}
#: (file, module) imports allowed inside a function whatever the layers: the front door's lazy re-export of the API
FRONT_DOOR = {("src/scdino/__init__.py", "scdino.api")}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "scdino":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("engine", "export", "training", "api") else "core"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top


def _violations(folders: dict[str, Path] = FOLDERS, root: Path = ROOT) -> list[str]:
    out = []
    for stage, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            for name, line, at_top in _imports(path):
                target = _stage(name)
                if target is None or target in (stage, "core"):
                    continue
                if (path.relative_to(root).as_posix(), name) in FRONT_DOOR and not at_top:
                    continue
                where = f"{path.relative_to(root)}:{line} imports {name}"
                if target not in ALLOWED[stage]:
                    out.append(f"{where}: {stage} may not import {target}")
                elif not at_top:
                    out.append(f"{where} inside a function: import it at the top of the module")
    return out


def test_stages_import_only_the_layers_below_them_at_module_level():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path):
    core = tmp_path / "core"
    core.mkdir()
    (core / "bad.py").write_text("def f():\n    from scdino.training.loop import train\n")
    (core / "good.py").write_text("from scdino.knn import evaluate_knn\n")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "late.py").write_text("def f():\n    import scdino.export.quantize\n")
    got = _violations({"core": core, "engine": tmp_path / "engine"}, tmp_path)
    assert any("core/bad.py:2 imports scdino.training.loop: core may not import training" in v for v in got)
    assert any("engine/late.py:2 imports scdino.export.quantize inside a function" in v for v in got)
    assert not any("good.py" in v for v in got) and len(got) == 2
