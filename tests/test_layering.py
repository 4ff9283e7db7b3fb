"""The import rules of docs/design.md section 2, read from the source (imports at any depth).

Each package of lib/ (and models/) may import only the packages listed below; lib/utils is
the ground floor; no library file imports a CLI script; and no two files import each other,
directly or around a longer circle.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALLOWED = {
    "utils": set(),
    "rl": {"utils"},
    "quantize": {"utils"},
    "simulator": {"utils", "models"},
    "allocate": {"quantize", "simulator", "utils"},
    "env": {"quantize", "simulator", "utils"},
    "report": {"env", "quantize", "simulator", "utils", "models"},
    "export": {"quantize", "simulator", "utils", "models"},
    "finetune": {"env", "quantize", "simulator", "utils", "models"},
    "search": {"allocate", "env", "rl", "report", "quantize", "simulator", "utils", "models"},
    "models": {"quantize", "utils"},
}
CLIS = {"rl_quantize", "finetune", "pretrain"}


def _modules():
    """{module name: path} of every Python file under lib/ and models/."""
    found = {}
    for top in ("lib", "models"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _imports(module, path):
    """Absolute names a file imports (relative imports resolved), each name also as module.attr."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:   # `from . import x` imports x, not the package itself
                names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def _package(module):
    """'quantize' for lib.quantize.linear, 'models' for models.resnet."""
    parts = module.split(".")
    return "models" if parts[0] == "models" else parts[1] if len(parts) > 1 else None


def _graph():
    modules = _modules()
    return modules, {m: {n for n in _imports(m, p) if n in modules} for m, p in modules.items()}


def test_every_package_imports_only_what_it_may():
    modules, graph = _graph()
    assert set(ALLOWED) >= {_package(m) for m in modules if _package(m)}, "a package without rules"
    wrong = sorted((m, n) for m, targets in graph.items() if _package(m) for n in targets
                   if _package(n) != _package(m) and _package(n) not in ALLOWED[_package(m)])
    assert not wrong


def test_no_library_file_imports_a_cli_script():
    modules, _ = _graph()
    bad = [(m, n) for m, p in modules.items() for n in _imports(m, p) if n.split(".")[0] in CLIS]
    assert not bad


def _circle(graph):
    """One import circle of ``graph`` as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circles():
    assert _circle(_graph()[1]) is None


def test_a_circle_is_found():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_rules_catch_an_upward_import():
    """The check is not vacuous: lib/utils importing lib/quantize is reported."""
    _, graph = _graph()
    graph = {m: set(t) for m, t in graph.items()}
    graph["lib.utils.layers"].add("lib.quantize.linear")
    wrong = [(m, n) for m, targets in graph.items() if _package(m) for n in targets
             if _package(n) != _package(m) and _package(n) not in ALLOWED[_package(m)]]
    assert wrong == [("lib.utils.layers", "lib.quantize.linear")]
