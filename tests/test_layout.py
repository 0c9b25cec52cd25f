"""The house: imports run one way. Every project file's imports are read with ast (nothing is run), and the
graph must have no cycle, no function-level import of a project module, and no arrow from a library file
to an app or up to a higher floor."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ground first; a file may import from its own floor or below (acyclically), never above
FLOORS = [
    {"cli", "kernels"},                      # CLI plumbing; bit layout, pooling, dequant-matmul
    {"quant", "gguf_codec"},                 # quantizers and QuantLinear; GGUF blocks <-> codes
    {"model", "tokenizer"},
    {"qalora", "merge"},                     # the QA-LoRA story
    {"export", "generate", "data"},
    {"train", "eval", "bench", "replicate", "sweep", "quantize"},  # the apps
]
APPS = FLOORS[-1]
OPTIONAL = {"triton"}  # accelerators that may be imported lazily


def project_modules():
    return {p.stem for p in ROOT.glob("*.py")}


def imports(path, modules):
    """[(imported project module, line, at module level?)] of one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if __name__ == "__main__":` and try/except at module level count as module level
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n) if isinstance(m, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        out += [(name, node.lineno, id(node) in top) for name in names if name in modules | OPTIONAL]
    return out


def graph():
    modules = project_modules()
    return {m: imports(ROOT / f"{m}.py", modules) for m in modules}


def test_every_file_has_a_floor():
    floors = set().union(*FLOORS)
    assert project_modules() == floors, (f"files without a floor: {sorted(project_modules() - floors)}; "
                                         f"floors without a file: {sorted(floors - project_modules())}")


def test_no_function_level_project_imports():
    bad = [f"{m}.py:{line} imports {name} inside a function"
           for m, edges in graph().items() for name, line, top in edges if not top and name not in OPTIONAL]
    assert not bad, "\n".join(bad)


def test_imports_run_down_and_never_into_an_app():
    floor = {m: i for i, f in enumerate(FLOORS) for m in f}
    bad = []
    for m, edges in graph().items():
        for name, line, _ in edges:
            if name in OPTIONAL:
                continue
            if name in APPS and m not in APPS:
                bad.append(f"{m}.py:{line}: the library file imports the app {name}")
            elif floor[name] > floor[m]:
                bad.append(f"{m}.py:{line}: floor {floor[m]} imports {name} on floor {floor[name]}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = {m: {name for name, _, _ in edges if name not in OPTIONAL} for m, edges in graph().items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycle.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycle, "import cycles: " + "; ".join(" -> ".join(c) for c in cycle)


def test_the_qalora_story_fits_on_one_screen():
    """The adapter and the exact merge, what most readers come for, in at most 300 lines."""
    n = sum(len((ROOT / f).read_text().splitlines()) for f in ("qalora.py", "merge.py"))
    assert n <= 300, f"qalora.py + merge.py are {n} lines"
