"""The documentation cannot drift from the code: every Python block of README.md and of each page
of docs/ runs, as written and in order, as one script per page; every `nbcnn` command shown is
either run here or marked as not run (and then at least parsed by the command's own parser)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nbcnn.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
GPU_ONLY = "# needs a GPU"  # a Python block that starts with this line is not run here
NOT_RUN = "<!-- not run in the tests"  # the line before a block of commands that are not run here


def blocks(page):
    """(language, code, whether the line before the block marks it as not run) of each block."""
    text = page.read_text()
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        yield match.group(1), match.group(2), before.startswith(NOT_RUN)


def script(page):
    return "\n".join(code for language, code, _ in blocks(page)
                     if language == "python" and not code.startswith(GPU_ONLY))


def commands(page):
    """(command line, marked as not run) of each `nbcnn` command in the page's shell blocks."""
    for language, code, not_run in blocks(page):
        if language not in ("", "sh", "console"):  # python, and text: a command's output
            continue
        for line in code.splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            words = line.split()
            if words[:1] == ["nbcnn"] or words[:3] == ["python", "-m", "nbcnn"]:
                yield line, not_run


@pytest.mark.parametrize("page", [p for p in PAGES if script(p)], ids=lambda p: p.name)
def test_python_blocks_run_as_written(page, tmp_path):
    """A page's Python blocks, one after the other, in a fresh interpreter in an empty folder."""
    path = tmp_path / "page.py"
    path.write_text(script(page))
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"


SHOWN = [(page, line, not_run) for page in PAGES for line, not_run in commands(page)]


@pytest.mark.parametrize("page, line, not_run", SHOWN, ids=[f"{p.name}: {c}" for p, c, _ in SHOWN])
def test_every_command_shown_runs_or_is_marked_and_parses(page, line, not_run, tmp_path):
    argv = shlex.split(line)
    argv = argv[3:] if argv[0] == "python" else argv[1:]
    if any(word.startswith("[") or word.endswith("...") or "|" in word for word in argv):
        assert not_run, f"{page.name}: a synopsis must be in a block marked as not run: {line}"
        return  # a synopsis of the options, not a command
    if not_run:
        build_parser().parse_args(argv)  # SystemExit (status 2) on an option that does not exist
        return
    done = subprocess.run([sys.executable, "-m", "nbcnn", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{page.name}: {line}\n{done.stderr[-2000:]}"
