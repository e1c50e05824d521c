"""The layers only point down, and no module imports itself in a circle (read from the source, lazy imports too).

Bottom to top: ddm core (ddm, ddm.io, ddm.flow) → ddm.data → ddm.partition → ddm.models → ddm.training →
router | parallel_infer (siblings: neither imports the other) → evaluation → front ends (frontends, app, scripts).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # (module prefix, group, rank); a module belongs to the longest prefix of its name
    ("ddm", "ddm core", 0), ("ddm.io", "ddm core", 0), ("ddm.flow", "ddm core", 0),
    ("ddm.data", "ddm.data", 1), ("ddm.partition", "ddm.partition", 2), ("ddm.models", "ddm.models", 3),
    ("ddm.training", "ddm.training", 4),
    ("router", "router", 5), ("parallel_infer", "parallel_infer", 5),
    ("evaluation", "evaluation", 6),
    ("frontends", "front ends", 7), ("app", "front ends", 7), ("app_actions", "front ends", 7), ("scripts", "front ends", 7),
]
PACKAGES = ["ddm", "router", "parallel_infer", "evaluation", "frontends"]


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    for f in (ROOT / "scripts").glob("*.py"):
        mods[f"scripts.{f.stem}"] = f
    for name in ("app", "app_actions"):
        if (ROOT / f"{name}.py").exists():
            mods[name] = ROOT / f"{name}.py"
    return mods


def group_of(module: str) -> tuple[str, int]:
    prefix, group, rank = max((g for g in LAYERS if module == g[0] or module.startswith(g[0] + ".")), key=lambda g: len(g[0]))
    return group, rank


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its source (scripts' bare imports of siblings included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if module.startswith("scripts.") and f"scripts.{name}" in known:
                name = f"scripts.{name}"  # scripts put their own folder on sys.path
            if name in known:
                out.add(name)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    mods = module_files()
    return {m: imports_of(m, f, set(mods)) for m, f in mods.items()}


def test_every_import_points_down():
    wrong = []
    for module, targets in graph().items():
        group, rank = group_of(module)
        for target in targets:
            tgroup, trank = group_of(target)
            if module.startswith("scripts.") and target.startswith("scripts."):
                wrong.append(f"{module} imports {target} (scripts do not import each other)")
            elif tgroup != group and trank >= rank:
                wrong.append(f"{module} ({group}, layer {rank}) imports {target} ({tgroup}, layer {trank})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    g = graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == "open":
                circles.append(" → ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from router.ensemble import DDMEnsemble\n    import scripts_helper\n")
    known = {"router.ensemble", "router"}
    assert imports_of("ddm.data.images", bad, known) == {"router.ensemble"}
    assert group_of("ddm.data.images")[1] < group_of("router.ensemble")[1]
