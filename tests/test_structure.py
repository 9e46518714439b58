"""The code's structure, read with ``ast``: no module imports another module's private name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"core": "bitsweep", "flows": "bitsweep.flows", "plugins": "bitsweep.plugins", "bench": None}
BENCH_MODULES = {path.stem for path in (ROOT / "bench").glob("*.py")}  # bench's scripts import each other by name


def imported_module(node: ast.ImportFrom, package: str | None) -> str:
    """The absolute name of the module ``from X import ...`` reads, relative imports resolved in ``package``."""
    if not node.level:
        return node.module or ""
    base = (package or "").split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def is_ours(module: str, folder: str) -> bool:
    return module == "bitsweep" or module.startswith("bitsweep.") or (
        folder == "bench" and module.split(".")[0] in BENCH_MODULES)


def private_imports(source: str, folder: str, package: str | None) -> list[str]:
    """``line: from X import _name`` for each private name (one leading underscore) a bitsweep or bench module is
    asked for; third-party modules (torch's ``_ConvNd``) and dunders are not this test's business."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = imported_module(node, package)
            found += [f"{node.lineno}: from {module} import {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__") and is_ours(module, folder)]
    return found


def package_of(path: Path, folder: str) -> str | None:
    """The package a file of ``folder`` belongs to (its subfolders are subpackages)."""
    if PACKAGES[folder] is None:
        return None
    return ".".join([PACKAGES[folder], *path.parent.relative_to(ROOT / folder).parts])


def test_the_check_finds_private_imports_and_only_those():
    source = ("from bitsweep.schemes import _code_dtype, quantize_tensor\nfrom .datasets import _check_split\n"
              "from . import _helpers\nfrom torch.nn.modules.conv import _ConvNd\nfrom bitsweep import __version__\n"
              "def later():\n    from machine import _timer\n")
    assert private_imports(source, "plugins", "bitsweep.plugins") == [
        "1: from bitsweep.schemes import _code_dtype", "2: from bitsweep.plugins.datasets import _check_split",
        "3: from bitsweep.plugins import _helpers"]
    assert private_imports(source, "bench", None) == ["1: from bitsweep.schemes import _code_dtype",
                                                      "7: from machine import _timer"]
    assert imported_module(ast.parse("from .. import registry").body[0], "bitsweep.plugins") == "bitsweep"


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_module_imports_another_modules_private_name(folder):
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / folder).rglob("*.py"))
             for line in private_imports(path.read_text(), folder, package_of(path, folder))]
    assert not found, "make these names public (or move them to the module that uses them):\n" + "\n".join(found)
