"""The shape of the package: no import cycle, the model room imports nothing above it, no file past 400 lines, and
no code outside the draft registry and the draft classes asks a draft for its type name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "clover"
DRAFT_HOMES = {"model/registry.py", "model/clover2.py", "model/eagle.py"}
# the names a draft type goes by (type names and aliases, as in the registry)
DRAFT_NAME = r"""["'](?:clover2|clover|clover-2|eagle|eagle1|eagle-1)["']"""


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def clover_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def test_no_import_cycle_among_clover_modules():
    mods = modules()
    graph = {m: clover_imports(p, set(mods)) - {m} for m, p in mods.items()}
    state, order = {}, []

    def visit(m, stack):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(stack[stack.index(m):] + [m])
        state[m] = "open"
        for dep in sorted(graph[m]):
            if not dep.startswith(m + ".") and not m.startswith(dep + "."):  # a package and its own modules
                visit(dep, stack + [m])
        state[m] = "done"
        order.append(m)

    for m in sorted(graph):
        visit(m, [])
    assert len(order) == len(graph)


def test_the_model_room_imports_nothing_above_it():
    mods = modules()
    allowed = ("clover.model", "clover.errors", "clover.io")
    for name, path in mods.items():
        if name.startswith("clover.model"):
            above = {m for m in clover_imports(path, set(mods)) if not m.startswith(allowed)}
            assert not above, f"{name} imports {sorted(above)}"


def test_no_file_in_the_package_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_no_code_branches_on_a_draft_type_name():
    """Comparisons with, membership in, or dict keys of a draft type name live only in the registry and the draft
    classes (``mask_alignment="eagle"`` names the original loss-mask convention, not a draft)."""
    compare = re.compile(rf"(==|!=|\bin)\s*\(?\s*{DRAFT_NAME}|{DRAFT_NAME}\s*(==|!=|:\s*[^\s])")
    offending = []
    for path in ROOT.rglob("*.py"):
        if str(path.relative_to(ROOT)) in DRAFT_HOMES:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if compare.search(code) and "alignment" not in code and "help=" not in code:
                offending.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offending, "\n".join(offending)
