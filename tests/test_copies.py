"""Copies across root files must not drift (transformers' `check_copies`, in miniature).

A line `# Copied from <file>.py: <Name>` directly above a `def`, `class` or assignment says that
the object below is a verbatim copy of `<Name>` in `<file>.py` (a path relative to the repository root, e.g.
`dcae.py` or `kernels/linear_attention.py`), where it is defined at top level. Indentation is ignored,
so a copy may sit inside an `except ImportError:` fallback. An optional ` with A->B, C->D` applies those renames to the
original before comparing. The test fails with a unified diff when a copy differs from its original.
"""
import ast
import difflib
import glob
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"^# Copied from (?P<file>[\w/]+\.py): (?P<name>\w+)(?: with (?P<renames>.+))?$")


def _source_files():
    return sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kernels", "*.py")))


def _segments(path, top_level=True):
    """[(name, first line, last line)] of each def / class / simple assignment (1-based, with decorators);
    top level only, or at any depth (a copy may sit in an `except ImportError:` fallback)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in tree.body if top_level else ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.name, start, node.end_lineno))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    out.append((t.id, start, node.end_lineno))
    return out


def find_markers():
    """[(copy file, marker line, original file, name, renames)] over every root file and kernel."""
    found = []
    for path in _source_files():
        with open(path) as f:
            for i, line in enumerate(f, start=1):
                m = MARKER.match(line.strip())
                if m:
                    renames = [tuple(s.strip() for s in r.split("->")) for r in (m["renames"] or "").split(",") if r]
                    found.append((os.path.relpath(path, ROOT), i, m["file"], m["name"], renames))
    return found


def _span(path, name, after_line=None):
    """(first line, last line) of `name` at top level, or of the object right below the marker line."""
    if after_line is not None:  # the object that starts right below the marker
        found = [(s, e) for _, s, e in _segments(path, top_level=False) if s == after_line + 1]
        if not found:
            raise AssertionError(f"{path}:{after_line}: the marker must sit directly above a def, class or "
                                 f"assignment")
    else:
        found = [(s, e) for n, s, e in _segments(path) if n == name]
        if not found:
            raise AssertionError(f"{path} has no top-level {name}")
    return found[0]


def _segment(path, name, after_line=None):
    s, e = _span(path, name, after_line)
    lines = open(path).read().splitlines()
    return textwrap.dedent("\n".join(lines[s - 1:e])).splitlines()


def _expected_copy(orig, name, renames):
    original = "\n".join(_segment(os.path.join(ROOT, orig), name))
    for a, b in renames:
        original = re.sub(rf"\b{re.escape(a)}\b", b, original)
    return original


MARKERS = find_markers()


@pytest.mark.parametrize("copy,line,orig,name,renames", MARKERS,
                         ids=[f"{c}:{n}" for c, _, _, n, _ in MARKERS] or None)
def test_copy_matches_original(copy, line, orig, name, renames):
    original = _expected_copy(orig, name, renames)
    copied = "\n".join(_segment(os.path.join(ROOT, copy), name, after_line=line))
    if copied != original:
        diff = "\n".join(difflib.unified_diff(original.splitlines(), copied.splitlines(),
                                              f"{orig}: {name} (with renames)", f"{copy}:{line}", lineterm=""))
        pytest.fail(f"{copy}:{line} drifted from {orig}: {name} (`python tests/test_copies.py --fix` "
                    f"overwrites copies with their originals)\n{diff}")


def test_checker_catches_drift(tmp_path, monkeypatch):
    # The checker itself must fail on a drifted copy and pass on an exact one.
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "b.py").write_text("# Copied from a.py: f\ndef f(x):\n    return x + 2\n")
    (tmp_path / "c.py").write_text("# Copied from a.py: f with f->g\ndef g(x):\n    return x + 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    markers = {m[0]: m for m in find_markers()}
    assert set(markers) == {"b.py", "c.py"}
    with pytest.raises(pytest.fail.Exception, match="drifted"):
        test_copy_matches_original(*markers["b.py"])
    test_copy_matches_original(*markers["c.py"])


def fix_copies():
    """Overwrite every drifted copy with its original (renames applied, indentation kept)."""
    for copy, line, orig, name, renames in sorted(find_markers(), key=lambda m: (m[0], -m[1])):  # bottom up
        path = os.path.join(ROOT, copy)
        s, e = _span(path, name, after_line=line)
        lines = open(path).read().splitlines(keepends=True)
        indent = lines[s - 1][: len(lines[s - 1]) - len(lines[s - 1].lstrip())]
        new = [(indent + t if t else t) + "\n" for t in _expected_copy(orig, name, renames).splitlines()]
        if new != lines[s - 1:e]:
            print(f"fixed {copy}:{line} <- {orig}: {name}")
            lines[s - 1:e] = new
            with open(path, "w") as f:
                f.writelines(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--fix"]:
        fix_copies()
    else:
        sys.exit("usage: python tests/test_copies.py --fix   (to check, run pytest)")
