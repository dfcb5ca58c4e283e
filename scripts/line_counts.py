"""Line counts of the root files, as the README's methods table and issue 29's closing note give them.

    python scripts/line_counts.py [ROOT]      # ROOT: another checkout to count (default: this one)

For each file: its lines; the line where section 5 (the sampler, or the last of sections 1-5) ends; the lines of
marked copies (`# Copied from`, marker to the end of the object below it); and its own lines: the file less the
marked copies, the tiny default and the CLI sections. tests/test_readme.py checks the README's table against it."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("dcae", "sana", "sana_sprint", "hart", "dcar", "svdquant", "fast_dllm")
MARKER = re.compile(r"^\s*# Copied from ")


def banners(lines):
    """[(title, line)] of the numbered section banners (1-based line of the title)."""
    return [(m[2], i + 1) for i, line in enumerate(lines) if (m := re.match(r"# (\d+)\. (.*)", line))
            and i > 0 and lines[i - 1].startswith("# ---") and i + 1 < len(lines) and lines[i + 1].startswith("# ---")]


def copied_lines(text):
    """The 1-based line numbers inside marked copies: the marker and the def/class/assignment right below it."""
    lines = text.splitlines()
    spans = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.stmt):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            spans.setdefault(start, node.end_lineno)
    out = set()
    for i, line in enumerate(lines, start=1):
        if MARKER.match(line) and i + 1 in spans:
            out.update(range(i, spans[i + 1] + 1))
    return out


def counts(path):
    text = open(path).read()
    lines = text.splitlines()
    found = banners(lines)
    excluded = copied_lines(text)
    titles = [t for t, _ in found]
    for k, (title, line) in enumerate(found):  # the tiny default and the CLI, to the end of their section
        if title.startswith(("Tiny default", "CLI")):
            end = found[k + 1][1] - 2 if k + 1 < len(found) else len(lines)
            excluded.update(range(line - 1, end + 1))
    heart_end = next((line - 2 for t, line in found if t.startswith("Components")), None)
    heart_start = found[0][1] - 1 if found else None  # the first banner line of section 1
    return {"lines": len(lines), "sections_1_start": heart_start, "section_5_end": heart_end,
            "copied": len(copied_lines(text)),
            "own": len(lines) - len(excluded), "sections": titles}


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else ROOT
    print(f"{'file':16s} {'lines':>6s} {'sec 5 ends':>10s} {'copied':>7s} {'own':>6s}")
    for name in FILES:
        c = counts(os.path.join(root, f"{name}.py"))
        print(f"{name + '.py':16s} {c['lines']:6d} {str(c['section_5_end']):>10s} {c['copied']:7d} {c['own']:6d}")
