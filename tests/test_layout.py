"""The repository's shape. The modules import one another as a star without cycles: the stage scripts and
programs import shared modules, never one another, and no shared module imports a program or, through any
chain, itself (an import inside a function counts: data.py's old export imported tasks.py and tools.py,
which import data.py)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("common", "model", "muon", "flash_attention", "data", "tasks", "judge", "tools", "sandbox")
PROGRAMS = ("pretrain", "sft", "reward", "ppo", "chat", "run", "report", "galactica", "examples/export")


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


def readme_table(heading):
    """The rows of the first table under a README heading, each a list of its cells."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert heading in text, heading
    rows = []
    for line in text.split(heading, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # past the header and the |---| line


def line_count(name):
    with open(os.path.join(ROOT, name)) as f:
        return len(f.read().splitlines())


def test_the_readme_file_table_lists_every_program_and_module_with_its_line_count():
    """The table cannot drift: a file added, removed or grown shows here, with the count to write."""
    expected = {name: line_count(name) for name in os.listdir(ROOT) if name.endswith((".py", ".html"))}
    listed = {}
    for files, counts, *_ in readme_table("## The files"):
        for name, count in zip(files.split(" + "), counts.split(" + ")):
            listed[name.strip("`")] = int(count.replace(",", ""))
    assert listed == expected, f"write in the README's file table: {expected}"


def test_the_first_read_points_at_the_lines_it_names():
    """Each stop of the README's first read is a line range that starts at the line it names and stops just
    before the next line it names (or at the file's end), so that an edit that moves them fails here."""
    total = 0
    for _, name, lines, start, stop, _ in readme_table("## The first read"):
        with open(os.path.join(ROOT, name.strip("`"))) as f:
            text = f.read().splitlines()
        first, last = map(int, lines.split("-"))
        assert text[first - 1].lstrip().startswith(start.strip("`")), (name, first, text[first - 1])
        assert (stop == "the end" and last == len(text)) or text[last].lstrip().startswith(stop.strip("`")), \
            (name, last + 1, text[last] if last < len(text) else "past the end")
        total += last - first + 1
    assert 0 < total <= 1500  # an hour's reading
