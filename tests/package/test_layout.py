"""The package's shape, checked statically: the remote-code files import nothing of mea_hf but each other, and
dependencies between the package's levels point one way (app -> pipelines -> libraries -> model)."""

import ast
import sys
from pathlib import Path

import pytest

import mea_hf

PACKAGE = Path(mea_hf.__file__).parent
REMOTE_CODE = {"configuration_mea", "modeling_mea", "cache_mea", "paged_attention"}
REMOTE_CODE_THIRD_PARTY = {"torch", "transformers", "huggingface_hub"}
# Level of each top-level module or subpackage of mea_hf; a module may import from its own level or lower ones.
LEVELS = {
    "model": {"__init__", "configuration_mea", "modeling_mea", "cache_mea", "paged_attention", "memory", "convert", "gguf"},
    "libraries": {"utils", "resources", "data", "compress", "hub", "evaluation"},
    "pipelines": {"training", "recipes"},
    "app": {"cli"},
}
RANK = {part: rank for rank, parts in enumerate(LEVELS.values()) for part in parts}


def _part(module: Path) -> str:
    """The top-level part of mea_hf a file belongs to: its subpackage, or its own name for top-level modules."""
    relative = module.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved), including function-level ones."""
    package = ["mea_hf", *path.relative_to(PACKAGE).parent.parts]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
    return names


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if "resources" not in path.relative_to(PACKAGE).parts[:1])


def test_every_part_of_the_package_has_a_level():
    assert {_part(path) for path in MODULES} <= set(RANK)


@pytest.mark.parametrize("name", sorted(REMOTE_CODE))
def test_remote_code_imports_only_itself_torch_transformers_and_the_stdlib(name):
    for module in _imports(PACKAGE / f"{name}.py"):
        top = module.split(".")[0]
        if top == "mea_hf":
            assert module.split(".")[1] in REMOTE_CODE and len(module.split(".")) == 2, (name, module)
        else:
            assert top in REMOTE_CODE_THIRD_PARTY or top in sys.stdlib_module_names, (name, module)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_dependencies_point_down(path):
    own = RANK[_part(path)]
    for module in _imports(path):
        parts = module.split(".")
        if parts[0] != "mea_hf" or len(parts) == 1:
            continue  # `import mea_hf` registers the Auto classes: the model level
        assert RANK[parts[1]] <= own, f"{path.relative_to(PACKAGE)} (level {own}) imports {module} (level {RANK[parts[1]]})"
