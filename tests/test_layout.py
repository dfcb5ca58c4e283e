"""Every root file follows the one pattern the README's "How every file is laid out" describes: the same numbered
section banners in the same order, the method's heart first and whole (sections 1-5: config, modules, model,
training, sampler; no marked copy among them, and a length limit), a docstring with the same parts, the same loader
signatures, a short `main`, and one command line (the shared flags in the same order, with the same help)."""
import argparse
import glob
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_FILES = ("dcae", "sana", "sana_sprint", "hart", "dcar", "svdquant", "fast_dllm")
FILES = [n for n in METHOD_FILES if os.path.isfile(os.path.join(ROOT, f"{n}.py"))]
SECTIONS = ("Config and presets", "Modules", "Model", "Training", "Sampler", "Components: skip on first read",
            "Checkpoint loading", "Pipeline", "Beyond the paper's core", "Tiny default", "CLI")
OPTIONAL = {"Beyond the paper's core"}  # a file without extras has none
OPTIONAL_IN = {"dcae": {"Sampler", "Pipeline"}}  # an autoencoder: no sampling loop, its inference is encode/decode
HEART = SECTIONS[:5]  # a reader who stops after these has read the whole method
HEART_LIMIT = {"sana": 1100}  # sana.py holds two papers (SANA 1.0 and 1.5)
HEART_LIMIT_DEFAULT = 900
MAIN_LIMIT = 80  # lines of `main`: parse, check, load, run, write
MARKER = re.compile(r"^\s*# Copied from ")
BANNER = "# " + "-" * 106
SHARED_FLAGS = ("--prompt", "--ckpt", "--model", "--steps", "--guidance", "--height", "--width", "--seed", "--device",
                "--dtype", "--out", "--train", "--train-out", "--train-steps")
SAME_HELP = ("--device", "--dtype", "--train", "--train-out", "--train-steps")  # same meaning, same words, in every file


def sections(name):
    """[(number, title, line)] of the numbered banners: a dash line, '# N. Title', a dash line."""
    lines = open(os.path.join(ROOT, f"{name}.py")).read().splitlines()
    out = []
    for i, line in enumerate(lines[1:-1], start=1):
        m = re.match(r"# (\d+)\. (.*)", line)
        if m and lines[i - 1].startswith("# ---") and lines[i + 1].startswith("# ---"):
            assert lines[i - 1] == BANNER == lines[i + 1], f"{name}.py:{i}: banner width differs from {len(BANNER)}"
            out.append((int(m[1]), m[2], i + 1))
    return out, len(lines)


def test_no_stray_banners():
    """Every dashed banner line in a root file belongs to a numbered section banner."""
    for name in FILES:
        lines = open(os.path.join(ROOT, f"{name}.py")).read().splitlines()
        stray = [i + 1 for i, line in enumerate(lines) if line.startswith("# ---") and line != BANNER]
        assert not stray, f"{name}.py: banner lines of another width at {stray}"


@pytest.mark.parametrize("name", FILES)
def test_sections_in_the_canonical_order(name):
    found, n_lines = sections(name)
    assert [n for n, _, _ in found] == list(range(1, len(found) + 1)), f"{name}.py: sections not numbered 1..n"
    order = []
    for _, title, line in found:
        match = [s for s in SECTIONS if title.startswith(s)]
        assert match, f"{name}.py:{line}: section title {title!r} is not one of {SECTIONS}"
        order.append(SECTIONS.index(match[0]))
    assert order == sorted(order) and len(set(order)) == len(order), f"{name}.py: sections out of order"
    for required in [s for s in SECTIONS if s not in OPTIONAL | OPTIONAL_IN.get(name, set())]:
        assert required in [SECTIONS[i] for i in order], f"{name}.py has no {required!r} section"


def heart_span(name):
    """(first, last) line of sections 1-5: from the banner of section 1 to the line before section 6's banner."""
    found, _ = sections(name)
    start = next(line for _, title, line in found if title.startswith(HEART[0])) - 1
    end = next(line for _, title, line in found if title.startswith(SECTIONS[len(HEART)])) - 2  # section 6's
    return start, end


@pytest.mark.parametrize("name", FILES)
def test_the_heart_comes_first_and_whole(name):
    """Sections 1-5 hold the whole method and nothing copied: no `# Copied from` marker, and a length a reader can
    take in one sitting."""
    start, end = heart_span(name)
    lines = open(os.path.join(ROOT, f"{name}.py")).read().splitlines()
    copies = [start + i for i, line in enumerate(lines[start - 1:end]) if MARKER.match(line)]
    assert not copies, f"{name}.py: marked copies inside sections 1-5 at lines {copies}: move them to section 6"
    limit = HEART_LIMIT.get(name, HEART_LIMIT_DEFAULT)
    assert end - start + 1 <= limit, f"{name}.py: sections 1-5 span {end - start + 1} lines (limit {limit})"


@pytest.mark.parametrize("name", FILES)
def test_main_is_short(name):
    main = __import__(name).main
    n = len(inspect.getsourcelines(main)[0])
    assert n <= MAIN_LIMIT, f"{name}.main is {n} lines (limit {MAIN_LIMIT}): move checks and flags into helpers"


@pytest.mark.parametrize("name", FILES)
def test_docstring_parts(name):
    doc = __import__(name).__doc__
    assert re.search(r"arXiv:? ?\d{4}\.\d{5}", doc), "the paper's arXiv id"
    for part in ("Shapes:", "Deviations from the official code", "python "):
        assert part in doc, f"{name}.py's docstring lacks {part!r}"


@pytest.mark.parametrize("name", FILES)
def test_loaders_take_device_and_dtype_as_keywords(name):
    module = __import__(name)
    loaders = [f for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == name
               and (n.startswith("load_") or n == "from_pretrained") and "dtype" in inspect.signature(f).parameters]
    assert any(f.__name__ == "load_tiny" for f in loaders)
    for f in loaders:
        params = inspect.signature(f).parameters
        for p in ("device", "dtype"):
            assert params[p].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{f.__name__}: {p} is not keyword-only"


def parser_of(name, monkeypatch):
    """The argparse parser that `main` builds (captured when main parses --help)."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        __import__(name).main(["--help"])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    return captured["parser"]


def test_one_command_line(monkeypatch):
    helps = {}
    for name in FILES:
        parser = parser_of(name, monkeypatch)
        flags = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"]
        shared = [f for f in flags if f in SHARED_FLAGS]
        assert shared == [f for f in SHARED_FLAGS if f in shared], f"{name}.py: shared flags out of order: {shared}"
        assert flags[:len(shared)] == shared, f"{name}.py: its own flags must come after the shared ones: {flags}"
        for flag in ("--device", "--dtype", "--seed", "--out", "--train", "--train-out"):
            assert flag in shared, f"{name}.py has no {flag}"
        for a in parser._actions:
            if a.option_strings and a.option_strings[-1] in SAME_HELP:
                helps.setdefault(a.option_strings[-1], {})[name] = a.help
    for flag, by_file in helps.items():
        assert len(set(by_file.values())) == 1, f"{flag} has different help texts: {by_file}"


def test_no_root_file_imports_another_or_the_tests():
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        text = open(path).read()
        for other in METHOD_FILES:
            if other != os.path.basename(path)[:-3]:
                assert not re.search(rf"^\s*(from|import) {other}\b", text, re.M), f"{path} imports {other}"
        assert not re.search(r"^\s*(from|import) (tests|shapes_score|conftest|benchutil)\b", text, re.M), path
        assert not re.search(r"[\"'/]tests[\"'/]", text.split('"""', 2)[-1]), f"{path} reaches into tests/"
        assert not re.search(r"^\s*(from|import) kernels\b", text, re.M), \
            f"{path} imports kernels/ as a package: load it by path (load_kernel), or another `kernels` answers"
