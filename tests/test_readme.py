"""The README is what a newcomer reads in ten minutes: short, and no figure in it contradicts the code or the docs.

Its methods table gives each file's length and the length of its sections 1-5, computed here from the code
(scripts/line_counts.py), and each tiny demo's figure, which must be the one docs/<method>.md reports. Every
picture and every path it names exists, and its test command is the one .ci/run runs."""
import os
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import line_counts  # noqa: E402

README = open(os.path.join(ROOT, "README.md")).read()
MAX_LINES = 400


def table_rows():
    """{file stem: [cells]} of the methods table (the rows whose first cell links a root file)."""
    rows = {}
    for line in README.splitlines():
        m = re.match(r"\| \[`(\w+)\.py`\]", line)
        if m:
            rows[m[1]] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= MAX_LINES, f"README.md is {n} lines (limit {MAX_LINES}): move records into docs/<method>.md"


def test_methods_table_has_every_file():
    assert sorted(table_rows()) == sorted(line_counts.FILES)


@pytest.mark.parametrize("name", line_counts.FILES)
def test_methods_table_line_counts_are_the_codes(name):
    cell = table_rows()[name][-1]
    c = line_counts.counts(os.path.join(ROOT, f"{name}.py"))
    heart = c["section_5_end"] - c["sections_1_start"] + 1
    assert cell == f"{c['lines']} ({heart})", f"{name}.py: the README says {cell!r}, the code has {c['lines']} " \
                                              f"lines, {heart} in sections 1-5"


@pytest.mark.parametrize("name", line_counts.FILES)
def test_tiny_demo_figures_are_the_docs(name):
    """Every number in the tiny-demo cell is stated in docs/<method>.md (where its date and recipe are)."""
    cell = table_rows()[name][-2]
    docs = open(os.path.join(ROOT, "docs", f"{name}.md")).read()
    numbers = re.findall(r"\d+\.\d+", cell)
    assert numbers, f"{name}: the tiny-demo cell {cell!r} gives no figure"
    for x in numbers:
        assert re.search(rf"(?<![\d.]){re.escape(x)}(?![\d])", docs), f"{name}: {x} is not in docs/{name}.md"


def test_named_paths_exist():
    paths = set(re.findall(r"\]\(((?:assets|docs|scripts|tests|kernels)/[^)\s]+)\)", README))
    paths |= set(re.findall(r"`((?:scripts|tests|kernels|docs)/[\w./<>-]+\.(?:py|md))`", README))
    missing = [p for p in paths if "<" not in p and not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing


def test_every_method_has_a_picture():
    for name in line_counts.FILES:
        assert re.search(rf"\]\(assets/{name}_tiny\.png\)", README), f"no picture of {name}'s tiny demo"


def test_test_command_is_cis():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = re.search(r"## Tests\n\n```bash\n(.+)\n```", README)[1]
    assert command in ci


def test_use_it_from_python_runs(tmp_path):
    """The README's "Use it from Python" block runs as written, from the repository root."""
    import subprocess
    code = re.search(r"## Use it from Python\n.*?```python\n(.*?)```", README, re.S)[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
