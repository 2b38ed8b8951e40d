"""The layers hold: the library (`dni_rnn`) never imports the application (`dni_rnn.app`)
or the corpora, and the application's old import paths name the very same modules."""
import ast
import importlib
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "dni_rnn"
SHIM = "sys.modules[__name__] = _module"


def shims():
    return sorted(p.stem for p in PACKAGE.glob("*.py") if SHIM in p.read_text())


def library_modules():
    # __main__ is `python -m dni_rnn`, the command line: it starts the application
    return sorted(p for p in PACKAGE.glob("*.py")
                  if SHIM not in p.read_text() and p.name != "__main__.py")


def imported(path, tree=None):
    """(relative module names, absolute top-level names) that a file imports."""
    relative, absolute = set(), set()
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                names = [node.module] if node.module else [a.name for a in node.names]
                relative.update(n.split(".")[0] for n in names)
            else:
                absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
    return relative, absolute


def top_level_imports(path):
    """`imported` without the imports inside functions: `dni_rnn.load` reaches the
    application on call, the one import the rule allows (and only in __init__.py)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and path.name == "__init__.py" \
                and node.name == "load":
            tree.body.remove(node)
            break
    return imported(path, tree)


def test_the_library_imports_nothing_of_the_application():
    app = set(shims()) | {"app"}
    assert {"config", "run", "cli", "tasks"} <= app
    for path in library_modules():
        relative, absolute = top_level_imports(path)
        assert not relative & app, f"{path.name} imports the application: {relative & app}"
        assert "corpora" not in absolute, f"{path.name} imports corpora"


def test_import_dni_rnn_loads_no_application_module():
    code = ("import sys, dni_rnn; print(sorted(m for m in sys.modules "
            "if m.startswith('dni_rnn.app') or m == 'corpora'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.strip()
    assert out == "[]"


def test_old_import_paths_are_the_same_modules():
    for name in shims():
        assert importlib.import_module(f"dni_rnn.{name}") is \
            importlib.import_module(f"dni_rnn.app.{name}")


def test_tests_share_helpers_not_test_modules():
    for path in sorted((REPO / "tests").glob("*.py")):
        _, absolute = imported(path)
        assert not {m for m in absolute if m.startswith("test_")}, \
            f"{path.name} imports another test module; shared code goes in helpers.py"
