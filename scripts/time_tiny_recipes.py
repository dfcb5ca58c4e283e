"""Times every file's tiny --train recipe on this CPU from a short run, and computes the whole recipe's time.

    python scripts/time_tiny_recipes.py [--steps 12] [--files dcae sana ...]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/time_tiny_recipes.py   # an AVX2-only CPU

Each file's train_tiny runs with --steps steps in every phase (its own data sizes and batches), in a process of
its own, into a temporary folder; the pace of a phase is the mean time of its steps after the first (which pays for
warm-up), read from the file's TrainProgress. Prints, per file, the pace of each phase, the TINY_STEP_SECONDS line
it gives (what the files hold, measured on the CPU their TINY_REFERENCE names) and the whole recipe's time computed
from the paces and the recipe's step counts. Precision: each recipe's own choice on this CPU (training_precision).
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("dcae", "sana", "sana_sprint", "hart", "dcar", "svdquant", "fast_dllm")


def short_run(m, name, steps, out):
    """train_tiny of module m with `steps` steps in every phase; returns the recipe's (phase, steps) plan."""
    if name == "dcae":
        m.train_tiny(out=out, log=lambda *a: None, steps=steps)
        return [(f"phase {p}", n) for p, n, *_ in m.TINY_RECIPE]
    if name == "sana":
        m.train_tiny(out=out, log=lambda *a: None, steps=steps)
        return [("encode", 1), ("train", m.TINY_STEPS)]
    if name == "sana_sprint":
        m.train_tiny(out=out, log=lambda *a: None, steps=steps, teacher_steps=steps)
        return [("encode", 1), ("teacher", m.TINY_TEACHER_STEPS), ("student", m.TINY_STEPS)]
    if name == "hart":
        m.train_tiny(out=out, log=lambda *a: None, steps=steps, tokenizer_steps=steps)
        return [(f"tokenizer {s}", n) for s, n in m.TINY_TOKENIZER_STAGES] + [("code", 1), ("generator", m.TINY_STEPS)]
    if name == "dcar":
        m.train_tiny(out=out, log=lambda *a: None, steps=steps, dcht_steps=steps)
        return [(f"tokenizer {s}", n) for s, n in m.TINY_DCHT_STAGES] + [("tokenize", 1), ("generator", m.TINY_STEPS)]
    if name == "svdquant":
        m.train_tiny(out=out, log=lambda *a: None)  # its one phase, whole
        return [("calibrate and quantize", 1)]
    if name == "fast_dllm":
        for arch in ("llada", "dream"):
            m.train_tiny(out=os.path.join(os.path.dirname(out), f"{arch}.safetensors"), log=lambda *a: None,
                         steps=steps, arch=arch)
        return [("train llada", m.TINY_STEPS), ("train dream", m.TINY_STEPS)]
    raise ValueError(name)


def child(name, steps):
    """In this process: the paces of `name`'s phases, as one JSON line."""
    sys.path.insert(0, ROOT)
    m = importlib.import_module(name)
    times = {}  # phase -> [start, end of step 0, ..., end of the last step]

    class Timed(m.TrainProgress):
        def phase(self, phase):
            super().phase(phase)
            times[phase] = [time.perf_counter()]

        def step(self, i, **metrics):
            times[self.name].append(time.perf_counter())
            super().step(i, **metrics)

    m.TrainProgress = Timed
    with tempfile.TemporaryDirectory() as tmp:
        plan = short_run(m, name, steps, os.path.join(tmp, "w.safetensors"))
    pace = {p: (t[-1] - t[1]) / (len(t) - 2) if len(t) > 2 else t[-1] - t[0] for p, t in times.items()}
    print(json.dumps({"pace": pace, "plan": plan}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--files", nargs="+", default=list(FILES), choices=FILES)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.steps)
    import torch
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, native bf16: "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')!r}; {args.steps} steps a phase")
    for name in args.files:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        total = sum(n * r["pace"][phase] for phase, n in r["plan"])
        print(f"{name}: whole recipe {total / 60:.1f} min (computed); paces " +
              ", ".join(f"{k} {v:.4g} s" for k, v in r["pace"].items()))


if __name__ == "__main__":
    main()
