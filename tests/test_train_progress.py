"""What a --train run says before and while it runs (every file), and what a sampler shows on the command line:
the CPU and the precision, the plan with its time on the reference CPU, progress lines with an ETA, and this CPU's
estimate of the whole run once ten steps are timed."""
import importlib
import re
import sys

import pytest
import torch

import dcae
import sana
from test_ddp import SHORT


class Clock:
    """time.time for a TrainProgress, moved on by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_plan(progress, clock, plan, slowdown):
    """Runs the plan's steps, each `slowdown` times as long as on the reference."""
    for name, steps, seconds in plan:
        progress.phase(name)
        for i in range(steps):
            clock.now += seconds * slowdown
            progress.step(i, loss=1.0 / (i + 1))


def test_plan_pace_and_estimate(monkeypatch):
    """A CPU twice as slow as the reference: the plan gives the reference's time, the tenth step this CPU's whole
    run (its own pace in this phase, the reference's times two in the next), and the lines the ETA left."""
    plan = [("a", 20, 1.0), ("b", 10, 2.0)]
    clock = Clock()
    monkeypatch.setattr(dcae.time, "time", clock)
    lines = []
    progress = dcae.TrainProgress(plan, "the reference", lines.append, every=5)
    run_plan(progress, clock, plan, slowdown=2)
    assert lines[0] == "plan: a (20 steps), then b (10 steps); about 40 s on the reference"
    estimate = [line for line in lines if line.startswith("this CPU")]
    # 20 steps of 2 s, then 10 steps of 2 s on the reference, twice as slow here: 80 s
    assert estimate == ["this CPU: 2 s a step in a, 2.00x the reference's: the run will take about 1 min 20 s in all "
                        "(--train-steps N shortens every phase to N steps)"]
    steps = [line.split(" | ")[0] for line in lines if line.startswith(("a step", "b step"))]
    assert steps == ["a step 1/20", "a step 6/20", "a step 11/20", "a step 16/20", "a step 20/20", "b step 1/10",
                     "b step 6/10", "b step 10/10"]
    last_of_a = next(line for line in lines if line.startswith("a step 20/20"))
    assert "loss 0.0500" in last_of_a and last_of_a.endswith("40 s elapsed, ETA 40 s")  # b: 10 steps of 2 x 2 s
    assert lines[-1].endswith("1 min 20 s elapsed, ETA 0 s")


def test_terminal_progress_is_one_line_per_phase(monkeypatch, capsys):
    plan = [("a", 30, 0.1), ("b", 3, 0.1)]
    clock = Clock()
    monkeypatch.setattr(dcae.time, "time", clock)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = dcae.TrainProgress(plan, "the reference")
    run_plan(progress, clock, plan, slowdown=3)  # 0.3 s a step: every step redraws the line
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert lines[0].startswith("plan: ") and lines[-1] == ""
    # phase a's line rewritten in place, ended when the estimate takes a line of its own, then again up to its end
    assert lines[1].startswith("\ra step 1/30") and lines[1].count("\r") == 10
    assert lines[2].startswith("this CPU: ")
    assert lines[3].count("\r") == 20 and "a step 30/30" in lines[3].split("\r")[-1]
    assert lines[4].count("\r") == 3 and "b step 3/3" in lines[4].split("\r")[-1]


def test_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert sana.training_precision()[0] is True
    assert sana.training_precision(False) == (False, "as asked")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    bf16, why = sana.training_precision()
    assert bf16 is False and "limited to AVX2" in why
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert sana.training_precision() == (False, "this CPU has no native bfloat16, which would run ~9x slower than "
                                                "float32")


@pytest.mark.parametrize("name", sorted(SHORT))
def test_every_recipe_says_what_it_will_do(name, tmp_path):
    """A short run of each file's train_tiny: the CPU line, the precision and why, the plan with the reference's
    time, then progress lines with elapsed time and ETA, in that order."""
    module = importlib.import_module(name)
    lines = []
    module.train_tiny(seed=0, out=str(tmp_path / "w.safetensors"), log=lines.append, **SHORT[name])
    lines = [str(line) for line in lines]
    first = {key: next(i for i, line in enumerate(lines) if line.startswith(key)) for key in ("CPU: ", "precision: ",
                                                                                             "plan: ")}
    assert first["CPU: "] < first["precision: "] < first["plan: "], lines
    assert f"{torch.backends.cpu.get_cpu_capability()} kernels" in lines[first["CPU: "]]
    assert re.search(r"; about .+ on a 2-core Xeon with AMX", lines[first["plan: "]]), lines[first["plan: "]]
    assert not re.search(r"about 0 s on", lines[first["plan: "]]), "the recipe's reference times are missing"
    progress = [line for line in lines if re.search(r" elapsed, ETA \d", line)]
    assert progress and lines.index(progress[0]) > first["plan: "], lines


def test_cli_train_estimates_the_whole_run(tmp_path, capsys):
    """`dcae.py --train --train-steps 12`: after ten timed steps, this CPU's estimate of the whole (shortened) run."""
    dcae.main(["--train", "--train-steps", "12", "--train-out", str(tmp_path / "w.safetensors")])
    out = capsys.readouterr().out
    assert re.search(r"^this CPU: [\d.e-]+ s a step in phase 1, [\d.]+x the reference's: the run will take about "
                     r"(\d+ min )?\d+ s in all", out, re.M), out
    assert re.search(r"^phase 4 step 12/12 \| .* elapsed, ETA 0 s$", out, re.M), out


def test_cli_sampler_shows_its_steps(tmp_path, capsys):
    """The sampler's steps on stderr (stdout keeps what the run made)."""
    sana.main(["--prompt", "a red circle on a white background", "--out", str(tmp_path / "r.png"), "--steps", "7"])
    assert re.search(r"^sampling step 7/7 \| \d+ s elapsed, ETA 0 s$", capsys.readouterr().err, re.M)
