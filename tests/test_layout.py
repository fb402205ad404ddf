"""The package's import graph shows its layers: each folder imports only the layers below it, and nothing
inside the library reaches another module through the lazy `jlora` face, importlib or `jax._src`."""

import ast
from pathlib import Path

import jlora

PACKAGE = Path(jlora.__file__).parent
# A layer may import its own folder and any layer of lower rank; layers of one rank do not import each other.
RANKS = {"core": 0, "kinds": 1, "quant": 1, "models": 2, "training": 3, "interop": 3, "cli": 4}
# The one private JAX name, isolated in one function and tested there (tests/test_distributed.py).
PRIVATE_JAX = {("training/distributed.py", "jax._src")}


def imports(path):
    """`(line, module)` of every import in a file, function-level ones included; `from jlora import x` as `jlora.x`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "jlora":
                yield from ((node.lineno, f"jlora.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, node.module


def library_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def test_every_module_lives_in_a_layer_folder():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py"]
    assert {p.relative_to(PACKAGE).parts[0] for p in library_files()} == set(RANKS)


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for path in library_files():
        layer = path.relative_to(PACKAGE).parts[0]
        for line, module in imports(path):
            parts = module.split(".")
            if parts[0] != "jlora" or module == "jlora.__version__":
                continue
            target = parts[1] if len(parts) > 1 else None
            if target is None or target not in RANKS:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} (the lazy face)")
            elif target != layer and RANKS[target] >= RANKS[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({layer}) imports {module} ({target})")
    assert wrong == []


def test_no_hidden_edges_importlib_or_private_jax():
    found = set()
    for path in library_files():
        for _, module in imports(path):
            if module == "importlib" or module.startswith(("importlib.", "jax._src")):
                found.add((path.relative_to(PACKAGE).as_posix(), module.split(" ")[0]))
    assert found == PRIVATE_JAX


def test_no_module_is_imported_by_its_old_flat_path():
    old = {f"jlora.{name}" for name in jlora.MODULES}
    found = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jlora"):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in names if name in old]
    assert found == []
