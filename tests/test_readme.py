"""README.md's Python runs as written: every ```python block, and every ``bitsweep.…`` name its text cites.

The blocks run in README order in one fresh interpreter, each in a fresh namespace, all in one temporary
folder (a block may read a file an earlier one wrote). Tracebacks point at README.md's own lines.
Blocks indented inside a list are excerpts and are not run here: the plugin's (its whole module is
tests/example_plugin, which tests/test_plugins.py installs and runs) and a SLURM cluster's (it needs a
batch system).
"""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

RUNNER = '''
import json, sys, traceback

blocks = json.loads(sys.stdin.read())
results = {}
for block in blocks:
    namespace = {"__name__": "__main__"}
    try:
        code = "\\n" * (block["line"] - 1) + block["code"]  # README.md's line numbers in tracebacks
        exec(compile(code, "README.md", "exec"), namespace)
        results[block["id"]] = None
    except BaseException as exc:  # the traceback from the block's own frame on
        results[block["id"]] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
print(json.dumps(results))
'''


def fenced_blocks(text: str):
    """(language, first line number, code, heading) of each fenced block; the heading is the last one above it."""
    heading, language, start, lines = "", None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if language is None and line.startswith("```"):
            language, start, lines = line[3:].strip(), number + 1, []
        elif language is not None and line.strip() == "```":
            yield language, start, "\n".join(lines) + "\n", heading
            language = None
        elif language is not None:
            lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()


def python_blocks() -> list[dict]:
    """README's Python blocks, each named by its section (``#2``, ``#3`` for a section's later blocks)."""
    blocks, seen = [], {}
    for language, line, code, heading in fenced_blocks(README.read_text()):
        if language == "python":
            seen[heading] = seen.get(heading, 0) + 1
            name = heading if seen[heading] == 1 else f"{heading} #{seen[heading]}"
            blocks.append({"id": name, "line": line, "code": code})
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each block's traceback, or None when it ran."""
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(BLOCKS), text=True,
                            capture_output=True, cwd=tmp_path_factory.mktemp("readme"), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow  # the int8 examples compile with inductor
@pytest.mark.parametrize("block", [block["id"] for block in BLOCKS])
def test_python_block_runs_as_written(block, outcomes):
    if outcomes[block] is not None:
        line = next(b["line"] for b in BLOCKS if b["id"] == block)
        pytest.fail(f"README.md's block at line {line} ({block}) fails:\n{outcomes[block]}", pytrace=False)


def cited_names(text: str) -> list[str]:
    """Dotted ``bitsweep.…`` names in the README's inline code, outside fenced blocks (``bitsweep.schemes()`` cites
    ``bitsweep.schemes``)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return sorted({name for span in spans for name in re.findall(r"(?<![\w.])bitsweep(?:\.[A-Za-z_]\w*)+", span)})


def resolve(name: str):
    """What ``name`` is to a reader who imported its modules (``import bitsweep.allocate`` for
    ``bitsweep.allocate.allocate``) and then wrote it out."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:end]))
            break
        except ModuleNotFoundError as exc:
            if exc.name != ".".join(parts[:end]):  # a module that is there but fails to import
                raise
    found = importlib.import_module(parts[0])
    for part in parts[1:]:
        found = getattr(found, part)
    return found


@pytest.mark.parametrize("name", cited_names(README.read_text()))
def test_every_cited_name_resolves(name):
    try:
        resolve(name)
    except AttributeError as exc:
        pytest.fail(f"README.md cites `{name}`, which does not resolve: {exc}")
