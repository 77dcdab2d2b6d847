"""The repository's shape. The modules import one another as a star without cycles: the stage scripts and
programs import shared modules, never one another, and no shared module imports a program or, through any
chain, itself (an import inside a function counts: data.py's old export imported tasks.py and tools.py,
which import data.py)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("common", "model", "muon", "flash_attention", "data", "tasks", "tools", "sandbox")
PROGRAMS = ("pretrain", "sft", "reward", "ppo", "chat", "run", "report", "examples/export")


def imports(name, root=ROOT):
    """The repository's modules that name.py imports, anywhere in the file."""
    with open(os.path.join(root, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {m.split(".")[0] for m in found} & set(SHARED + PROGRAMS)


def cycle(graph):
    """A list of modules that import each other in a ring, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
    return next((found for m in graph if m not in state and (found := visit(m, [m]))), None)


def test_the_modules_import_as_a_star_without_cycles():
    graph = {m: imports(m) for m in SHARED + PROGRAMS if os.path.exists(os.path.join(ROOT, f"{m}.py"))}
    assert set(graph) == set(SHARED + PROGRAMS)
    for m, imported in graph.items():
        assert not imported & set(PROGRAMS), f"{m} imports the program(s) {imported & set(PROGRAMS)}"
    assert cycle(graph) is None, f"an import cycle: {' -> '.join(cycle(graph))}"
    assert cycle({"data": {"tasks"}, "tasks": {"sandbox", "data"}, "sandbox": set()}) == ["data", "tasks", "data"]
