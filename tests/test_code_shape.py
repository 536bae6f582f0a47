"""The shape of the code in jdrop/: short functions, no JAX internals, imports that flow one way (DESIGN.md's layers).

Static checks on the source text (``ast`` and ``tokenize``; nothing is imported or compiled):

- no function has more than 60 lines of code (docstrings, comments and blank lines not counted);
- nothing reads ``jax._src`` (JAX's private modules change without notice);
- the module-level imports between jdrop's modules never point to a higher layer and form no circle; an import
  inside a function that points up is listed in ``LAZY_UPWARD`` with its reason;
- a name imported from another jdrop module is in that module's ``__all__`` or carries a leading underscore (the
  marker of a package-private name), so no private name crosses modules unmarked.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jdrop"
MAX_FUNCTION_LINES = 60

LAYERS = (
    ("jdrop._typing", "jdrop._validation", "jdrop._batching", "jdrop._shard_map", "jdrop._linear"),  # the foundation
    ("jdrop.masks",),
    ("jdrop._dropout",),
    ("jdrop.variants",),
    ("jdrop.attention",),
    ("jdrop.mlp",),
    ("jdrop.train", "jdrop.distributed", "jdrop.checkpoint"),
    ("jdrop.interop",),
    ("jdrop", "jdrop.data", "jdrop.__main__"),  # the package face and the demo
)
"""DESIGN.md's layers, bottom to top: a module may import its own layer and those below."""

LAZY_UPWARD = {
    ("jdrop.variants", "jdrop.train"): "the old jdrop.variants names of mc_predict and rdrop_loss, resolved on use",
}
"""Imports inside a function that point to a higher layer, each with the reason it is there."""


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == name or (name != "jdrop" and module.startswith(name + ".")) for name in layer):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS (DESIGN.md): add it where it belongs")


def _code_lines(source: str, tree: ast.Module) -> set[int]:
    """The lines that hold code: some token other than a comment, and not inside a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skipped = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstrings


def _imports(module: str, tree: ast.Module) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``(module-level imports as (target, names), targets imported inside functions)`` among jdrop's modules."""
    top_level, lazy = [], []

    def targets(node: ast.AST) -> list[tuple[str, list[str]]]:
        found = []
        if isinstance(node, ast.Import):
            found = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in MODULES else (node.module, [alias.name]))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) == "importlib.import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found = [(node.args[0].value, [])]
        return [(target, names) for target, names in found if target.split(".")[0] == "jdrop"]

    def visit(node: ast.AST, in_function: bool) -> None:
        for target, names in targets(node):
            (lazy.append(target) if in_function else top_level.append((target, names)))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top_level, lazy


PARSED = {module: ast.parse(path.read_text()) for module, path in MODULES.items()}
IMPORTS = {module: _imports(module, tree) for module, tree in PARSED.items()}


def test_no_function_is_longer_than_60_lines_of_code():
    too_long = []
    for module, tree in PARSED.items():
        lines = _code_lines(MODULES[module].read_text(), tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                count = sum(1 for line in lines if start <= line <= node.end_lineno)
                if count > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name} (line {node.lineno}): {count} lines of code")
    assert not too_long, too_long


def _reads_jax_internals(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        imported = (
            [alias.name for alias in node.names] if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        )
        if any(name == "jax._src" or name.startswith("jax._src.") for name in imported):
            lines.append(node.lineno)
        if isinstance(node, ast.Attribute) and node.attr == "_src" and ast.unparse(node.value) == "jax":
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("module", MODULES)
def test_no_module_reads_jax_internals(module):
    assert not _reads_jax_internals(PARSED[module]), f"{module} reads jax._src"


def test_imports_never_point_to_a_higher_layer():
    upward = []
    for module, (top_level, lazy) in IMPORTS.items():
        for target in [t for t, _ in top_level] + lazy:
            if _layer(target) > _layer(module) and (module, target) not in LAZY_UPWARD:
                upward.append(f"{module} -> {target}")
    assert not upward, upward
    for (module, target), _reason in LAZY_UPWARD.items():  # each exception is still there and still lazy
        assert target in IMPORTS[module][1] and target not in [t for t, _ in IMPORTS[module][0]], (module, target)


def test_module_level_imports_form_no_circle():
    graph = {module: {t for t, _ in top_level if t in MODULES and t != module} for module, (top_level, _) in
             IMPORTS.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def _all(module: str) -> set[str]:
    for node in PARSED[module].body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_names_imported_across_modules_are_public_or_marked_private():
    unmarked = []
    for module, (top_level, _) in IMPORTS.items():
        for target, names in top_level:
            if target in MODULES:
                unmarked += [f"{module} imports {target}.{name}" for name in names
                             if not name.startswith("_") and name not in _all(target)]
    assert not unmarked, unmarked


def test_the_layers_cover_every_module_and_the_graph_is_not_empty():
    for module in MODULES:
        _layer(module)
    assert "jdrop.masks._bits" in [target for target, _ in IMPORTS["jdrop.masks"][0]]
    assert "jdrop.train" in IMPORTS["jdrop.variants"][1]
