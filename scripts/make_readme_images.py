"""The README's pictures of the tiny default models, written to assets/ (rerun after retraining a tiny model):

    python scripts/make_readme_images.py
    python scripts/make_readme_images.py fast_dllm      # only assets/fast_dllm_tiny.png
    python scripts/make_readme_images.py sana_lora      # only assets/sana_lora_tiny.png (trains a LoRA: minutes)

assets/sana_tiny.png   the tiny SANA: one row per prompt (README order), four seeds per row, 20 Flow-DPM steps at
                       the tiny model's default guidance; each row's caption and how many of its four images the
                       shapes scorer reads as right are printed (and listed in the README)
assets/dcae_tiny.png   the tiny DC-AE: pairs of rows, synthetic inputs above their reconstructions
assets/sana_sprint_tiny.png  the tiny SANA-Sprint student: one row per prompt, seed 0, columns: the student at 1, 2
                       and 4 steps, then its teacher (the tiny SANA) at 20 steps
assets/svdquant_tiny.png  the tiny SANA quantized to W4A4: one row per prompt, seed 0, columns: 16-bit, naive W4A4,
                       smoothing only, SVDQuant (the committed weights/svdquant_tiny.safetensors)
assets/dcar_tiny.png   the tiny DC-AR: one row per prompt, four seeds per row, its default rounds and guidance, with
                       what the scorer reads, as for the tiny SANA
assets/sana_controlnet_tiny.png  the tiny ControlNet on the tiny SANA: one row per held-out scene, columns: the scene,
                       its edge map (the control image), the output steered by it, the output without control (the
                       same noise and caption)
assets/hart_tiny.png   the tiny HART: one row per prompt, four seeds per row, its default guidance, with what the
                       scorer reads, as for the tiny SANA
assets/sana_lora_tiny.png  a LoRA of the tiny SANA on outlined shapes (trains
                       it: writes scripts/make_lora_style_data.py's folder, runs `sana.py --train --data DIR
                       --lora-rank 8` with the tiny recipe, minutes): one row per prompt, seed 0 and 1, columns: a
                       training image's style for that caption, the tiny SANA, the tiny SANA + the LoRA (x2 seeds)
assets/fast_dllm_tiny.png  the tiny LLaDA answering 'sort 8315' block by block: one row per forward, one column per
                       answer position (grey: MASK, orange: committed by this forward, '.': EOS); top, Fast-dLLM
                       (DualCache + threshold 0.9, 128 tokens in 4 blocks of 32); below, the baseline sampler on
                       32 tokens (one token per forward)
"""
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")]  # + shapes_score, style data
import dcae  # noqa: E402
import fast_dllm  # noqa: E402
import dcar  # noqa: E402
import hart  # noqa: E402
import sana  # noqa: E402
import sana_sprint  # noqa: E402
import svdquant  # noqa: E402
import shapes_score  # noqa: E402
from make_lora_style_data import draw_outlined, write_folder  # noqa: E402

ASSETS = os.path.join(ROOT, "assets")
PROMPTS = [  # the tiny model's grammar: "a/two/three <colour> <shape>[s] on a <colour> background"
    "a red circle on a white background",
    "two blue squares on a yellow background",
    "three green triangles on a black background",
    "a white square on a red background",
    "two red circles on a gray background",
    "three blue squares on a green background",
    "a black triangle on a yellow background",
    "two gray squares on a white background",
]
SEEDS = (0, 1, 2, 3)


def grid(rows, gap=2, scale=2):
    """rows of (H, W, 3) uint8 images -> one image, white gaps between cells, nearest-neighbour upscaled."""
    h, w = rows[0][0].shape[:2]
    out = np.full((len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    return Image.fromarray(out).resize((out.shape[1] * scale, out.shape[0] * scale), Image.NEAREST)


def seed_rows(generate, name):
    """One row per prompt, one image per seed; prints how many of each row the scorer reads right."""
    rows = []
    for prompt in PROMPTS:
        row = [generate(prompt, s) for s in SEEDS]
        right = sum(shapes_score.fidelity([img], [prompt]) for img in row)
        print(f"{name}, {prompt}: {right:.0f}/{len(SEEDS)} right")
        rows.append(row)
    return rows


def decoding_states(model, ids, **sampler):
    """fast_dllm.generate on one prompt -> (the whole sequence (L,) after each forward, as rows, the final one last).
    A wrapper records the sequence each forward starts from: the full x, or the x that a cached forward's window
    (a view of it) belongs to."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def forward(self, x, *args, **kwargs):
            seen.append((x if x._base is None else x._base)[0].clone())
            return self.inner(x, *args, **kwargs)
    out, nfe = fast_dllm.generate(Recorder(), ids, **sampler)
    assert len(seen) == nfe
    return seen[1:] + [out[0]]


def decoding_panel(rows, prompt_len, block, mask_id, eos_id, tok, title, cell=13):
    """rows (forwards x L) -> an image: one row per forward over the answer positions, blocks framed."""
    font = ImageFont.load_default(cell - 2)
    left, top = 86, 34
    G = len(rows[0]) - prompt_len
    img = Image.new("RGB", (left + G * cell + 2, top + len(rows) * cell + 2), "white")
    d = ImageDraw.Draw(img)
    d.text((2, 2), title, fill="black", font=ImageFont.load_default(13))
    before = torch.full_like(rows[0], mask_id)
    for r, row in enumerate(rows):
        y = top + r * cell
        d.text((2, y), f"forward {r + 1}", fill="black", font=font)
        for j, t in enumerate(row[prompt_len:].tolist()):
            x = left + j * cell
            new = t != mask_id and before[prompt_len + j] == mask_id
            fill = (150, 150, 150) if t == mask_id else (255, 170, 60) if new else (255, 255, 255)
            d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(215, 215, 215))
            if t != mask_id:
                d.text((x + cell // 2, y + cell // 2), "." if t == eos_id else tok.decode([t]), fill="black",
                       font=font, anchor="mm")
        before = row
    for b in range(0, G + 1, block):  # block frames and names
        x = left + b * cell
        d.line((x, top - 4, x, top + len(rows) * cell), fill="black", width=2)
        if b < G:
            d.text((x + 3, top - 14), f"block {b // block + 1}", fill="black", font=font)
    return img


def fast_dllm_tiny():
    """assets/fast_dllm_tiny.png: the tiny LLaDA decoding 'sort 8315' with Fast-dLLM, then with the baseline."""
    model, tok = fast_dllm.load_tiny()
    ids = fast_dllm.encode_prompt(tok, fast_dllm.TINY_EXAMPLE, fast_dllm.tiny_template)
    cfg, P = model.cfg, ids.shape[1]
    fast = decoding_states(model, ids, gen_length=128, block_length=32, cache="dual", threshold=0.9)
    base = decoding_states(model, ids, gen_length=32, block_length=32, cache="none")
    panels = [decoding_panel(fast, P, 32, cfg.mask_token_id, cfg.eos_token_id, tok,
                             f"Fast-dLLM (DualCache + threshold 0.9): '{fast_dllm.TINY_EXAMPLE}', 128 tokens in "
                             f"blocks of 32, {len(fast)} forwards"),
              decoding_panel(base, P, 32, cfg.mask_token_id, cfg.eos_token_id, tok,
                             f"baseline (--cache none): 32 tokens, {len(base)} forwards, one token each")]
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels) + 12), "white")
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (0, panels[0].height + 12))
    d, font, x, y = ImageDraw.Draw(out), ImageFont.load_default(13), panels[1].width + 40, panels[0].height + 50
    for i, (fill, text) in enumerate([((150, 150, 150), "MASK: not decoded yet"),
                                      ((255, 170, 60), "committed by this forward"),
                                      ((255, 255, 255), "committed by an earlier forward ('.' = EOS)")]):
        d.rectangle((x, y + 22 * i, x + 12, y + 22 * i + 12), fill=fill, outline=(120, 120, 120))
        d.text((x + 20, y + 22 * i - 1), text, fill="black", font=font)
    d.text((x, y + 80), "Rows: the answer after each forward; columns: answer positions.\n"
           "Fast-dLLM refreshes its DualCache once per block and commits every token\n"
           "of the block whose confidence is at least 0.9 (and always the most confident).\n"
           "The baseline commits one token per forward: the most confident MASK of the block.",
           fill="black", font=font, spacing=6)
    out.save(os.path.join(ASSETS, "fast_dllm_tiny.png"))
    print(f"Fast-dLLM: {len(fast)} forwards for 128 tokens, the baseline {len(base)} for 32; wrote "
          f"{ASSETS}/fast_dllm_tiny.png")


def sana_lora():
    """assets/sana_lora_tiny.png: a LoRA trained by the CLI on the outlined style folder, before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        data, lora = os.path.join(tmp, "outlined"), os.path.join(tmp, "style.safetensors")
        write_folder(data)
        subprocess.run([sys.executable, os.path.join(ROOT, "sana.py"), "--train", "--data", data, "--lora-rank", "8",
                        "--train-out", lora], check=True)
        torch.set_num_threads(2)
        base, styled = sana.load_tiny(), sana.load_tiny()
        sana.apply_lora(styled.transformer, sana.read_lora(lora), 1.0, lora)

    def draw(pipe, prompt, seed):
        return pipe.generate([prompt], 64, 64, 20, None, torch.Generator().manual_seed(seed))[0].numpy()
    rows = []
    for prompt in PROMPTS[:6]:
        c = shapes_score.parse_caption(prompt)
        example = draw_outlined(c["count"], c["color"], c["shape"], c["background"], size=64, rng=random.Random(0))
        rows.append([np.asarray(example)] + [draw(pipe, prompt, s) for pipe in (base, styled) for s in (0, 1)])
    grid(rows).save(os.path.join(ASSETS, "sana_lora_tiny.png"))
    print(f"wrote {ASSETS}/sana_lora_tiny.png")


def main():
    torch.set_num_threads(1)
    os.makedirs(ASSETS, exist_ok=True)
    fast_dllm_tiny()
    pipe = sana.load_tiny()
    grid(seed_rows(lambda p, s: pipe.generate([p], 64, 64, 20, None, torch.Generator().manual_seed(s))[0].numpy(),
                   "SANA")).save(os.path.join(ASSETS, "sana_tiny.png"))
    if os.path.isfile(dcar.TINY_WEIGHTS):
        ar = dcar.load_tiny()
        grid(seed_rows(lambda p, s: ar.generate([p], generator=torch.Generator().manual_seed(s))[0].numpy(),
                       "DC-AR")).save(os.path.join(ASSETS, "dcar_tiny.png"))
    if os.path.isfile(hart.TINY_WEIGHTS):
        ha = hart.load_tiny()
        grid(seed_rows(lambda p, s: ha.generate([p], generator=torch.Generator().manual_seed(s))[0].numpy(),
                       "HART")).save(os.path.join(ASSETS, "hart_tiny.png"))
    if os.path.isfile(sana.TINY_CONTROLNET):
        controlled, controlnet = sana.load_tiny(), sana.load_tiny_controlnet()
        x, captions = sana.shapes_batch(4, seed=2028)
        edges = sana.edge_map(x)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        steered = controlled.generate(captions, 64, 64, 20, None, g(),
                                      model=sana.control_model(controlled, controlnet, edges, 64, 64)).numpy()
        free = controlled.generate(captions, 64, 64, 20, None, g()).numpy()
        u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
        for cap, scene, a, b in zip(captions, u8(x), steered, free):
            print(f"ControlNet, {cap}: IoU with the scene {sana.control_iou(scene, a):.2f} steered, "
                  f"{sana.control_iou(scene, b):.2f} without control")
        grid([list(r) for r in zip(u8(x), u8(edges), steered, free)]).save(
            os.path.join(ASSETS, "sana_controlnet_tiny.png"))
    model = dcae.load_tiny()
    x, _ = dcae.shapes_batch(8, seed=2027)
    with torch.no_grad():
        rec = model(x)
    to_uint8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    grid([list(to_uint8(x)), list(to_uint8(rec))]).save(os.path.join(ASSETS, "dcae_tiny.png"))
    if not os.path.isfile(sana_sprint.TINY_WEIGHTS):
        print(f"{sana_sprint.TINY_WEIGHTS} missing (python sana_sprint.py --train): no Sprint grid")
        print(f"wrote {ASSETS}/sana_tiny.png and {ASSETS}/dcae_tiny.png")
        return
    student, rows = sana_sprint.load_tiny(), []
    for prompt in PROMPTS:
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        row = [student.generate([prompt], 64, 64, n, None, g())[0].numpy() for n in (1, 2, 4)]
        row.append(pipe.generate([prompt], 64, 64, 20, None, g())[0].numpy())
        right = [int(shapes_score.fidelity([img], [prompt])) for img in row]
        print(f"{prompt}: right at 1/2/4 steps and the teacher: {right}")
        rows.append(row)
    grid(rows).save(os.path.join(ASSETS, "sana_sprint_tiny.png"))
    print(f"wrote {ASSETS}/sana_tiny.png, {ASSETS}/dcae_tiny.png and {ASSETS}/sana_sprint_tiny.png")
    if not os.path.isfile(svdquant.TINY_WEIGHTS):
        print(f"{svdquant.TINY_WEIGHTS} missing (python svdquant.py --train): no SVDQuant row")
        return
    pipes = [pipe] + [svdquant.quantize_tiny(m, svdquant.replace(svdquant.TINY_QUANT, **svdquant.METHODS[m]),
                                             log=lambda *a: None) for m in ("naive", "smooth")]
    pipes.append(svdquant.load_tiny_quantized())
    rows = []
    for prompt in PROMPTS[:4]:
        row = [p.generate([prompt], 64, 64, 20, None, torch.Generator().manual_seed(0))[0] for p in pipes]
        psnr = [f"{svdquant.psnr(img, row[0]):.1f}" for img in row[1:]]
        print(f"{prompt}: PSNR vs 16-bit, naive / smoothing / SVDQuant: {' / '.join(psnr)} dB")
        rows.append([img.numpy() for img in row])
    grid(rows).save(os.path.join(ASSETS, "svdquant_tiny.png"))
    print(f"wrote {ASSETS}/svdquant_tiny.png")


if __name__ == "__main__":
    if sys.argv[1:] == ["fast_dllm"]:
        torch.set_num_threads(1)
        fast_dllm_tiny()
    elif sys.argv[1:] == ["sana_lora"]:
        sana_lora()
    else:
        main()
        sana_lora()
