"""Generation entry point: text prompts → PNG images, a grid and a JSON record.

    python -m dream_jax.sample --workdir=workdirs/tiny --prompt="a red circle" \
        --prompt="two blue squares" --num_images=4 --cfg=3.0 --sad_candidates=5 --out=samples/

Writes ``OUT/p{prompt:03d}_i{image:02d}.png`` for every image, ``OUT/grid.png``
(one row per prompt) and ``OUT/samples.json`` (prompts, seed, settings, every
candidate's score, the chosen candidate, timings). One progress line per batch.
"""
import json
import os

import numpy as np
from absl import app, flags


def define_flags(flag_values=None):
    """Defines the CLI flags on ``flag_values`` (default: absl's global FLAGS) and returns it.
    Called only when run as a program, so importing this module defines nothing."""
    fv = flags.FLAGS if flag_values is None else flag_values
    kw = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer.json, checkpoints/).", **kw)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **kw)
    flags.DEFINE_bool("use_ema", True, "Sample with the EMA weights.", **kw)
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).", **kw)
    flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines skipped).",
                        **kw)
    flags.DEFINE_integer("num_images", 4, "Images per prompt.", **kw)
    flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (1 = no guidance).", **kw)
    flags.DEFINE_enum("cfg_schedule", "linear", ["linear", "constant"], "How the guidance scale grows.", **kw)
    flags.DEFINE_float("temperature", 1.0, "Multiplies the diffusion noise std.", **kw)
    flags.DEFINE_integer("num_iter", 64, "MAR iterations.", **kw)
    flags.DEFINE_string("diffusion_steps", "100", "Respacing of the diffusion head: an int, or 'ddimK'.", **kw)
    flags.DEFINE_integer("sad_candidates", 5, "Candidates per image for sad / greedy / best_of_k.", **kw)
    flags.DEFINE_string("sad_step", None,
                        "SAD threshold: iterations (int, e.g. 32) or fraction decoded (float, e.g. 0.125); "
                        "default num_iter // 2.", **kw)
    flags.DEFINE_enum("mode", None, ["plain", "sad", "greedy", "best_of_k"],
                      "Decoding mode (default: sad when --sad_candidates or --sad_step is given, "
                      "else plain).", **kw)
    flags.DEFINE_integer("seed", 0, "Random seed.", **kw)
    flags.DEFINE_integer("batch_size", 16, "Image rows per compiled call.", **kw)
    flags.DEFINE_string("out", None, "Output directory.", **kw)
    return fv


def _parse_steps(text: str):
    text = text.strip()
    return int(text) if text.isdigit() else text


def _parse_sad_step(text):
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else float(text)


def resolve_mode(fv) -> str:
    """The decoding mode: --mode when given; otherwise giving --sad_candidates or --sad_step asks
    for SAD. Asking for plain decoding together with SAD settings is a usage error, not a silent
    plain run."""
    sad_given = [f"--{n}" for n in ("sad_candidates", "sad_step") if fv[n].present]
    if fv.mode is None:
        return "sad" if sad_given else "plain"
    if fv.mode == "plain" and sad_given:
        verb = "applies" if len(sad_given) == 1 else "apply"
        raise app.UsageError(f"{' and '.join(sad_given)} {verb} to --mode=sad, greedy or best_of_k, "
                             f"not to --mode=plain")
    return fv.mode


def read_prompts(prompts, prompts_file):
    out = list(prompts or [])
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            out.extend(line.strip() for line in f if line.strip())
    if not out:
        raise app.UsageError("give at least one --prompt or a --prompts_file")
    return out


def make_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 [rows*cols, H, W, 3] (row-major) → one uint8 image with white padding."""
    n, h, w, c = images.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_outputs(result, prompts, out_dir: str, seed: int) -> str:
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    per_prompt = result.settings["num_images_per_prompt"]
    records = []
    for i, image in enumerate(result.images):
        p, j = int(result.prompt_index[i]), i % per_prompt
        name = f"p{p:03d}_i{j:02d}.png"
        Image.fromarray(image).save(os.path.join(out_dir, name))
        records.append(dict(file=name, prompt=result.prompts[i], prompt_index=p, image_index=j,
                            scores=_jsonable(result.scores[i]), chosen=_jsonable(result.chosen[i]),
                            final_score=float(result.final_scores[i])))
    grid = make_grid(result.images, len(prompts), per_prompt)
    Image.fromarray(grid).save(os.path.join(out_dir, "grid.png"))
    record = dict(prompts=prompts, truncated=result.truncated, seed=seed,
                  settings={k: _jsonable(v) for k, v in result.settings.items()},
                  threshold=result.threshold, images=records,
                  timings={k: _jsonable(v) for k, v in result.timings.items()})
    path = os.path.join(out_dir, "samples.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def run(fv) -> str:
    """Generates with the parsed flags ``fv``; returns the path of the JSON record."""
    from dream_jax.sampling.api import Generator

    for name in ("workdir", "out"):
        if not fv[name].value:
            raise app.UsageError(f"--{name} is required")
    mode = resolve_mode(fv)
    prompts = read_prompts(fv.prompt, fv.prompts_file)
    generator = Generator.from_workdir(fv.workdir, step=fv.step, use_ema=fv.use_ema)
    print(f"loaded {generator.info['workdir']} step {generator.info['step']} "
          f"({'EMA' if fv.use_ema else 'raw'} weights); {len(prompts)} prompt(s) × {fv.num_images}, "
          f"mode {mode}", flush=True)
    result = generator.generate(
        prompts, num_images_per_prompt=fv.num_images, cfg=fv.cfg, temperature=fv.temperature,
        num_iter=fv.num_iter, diffusion_steps=_parse_steps(fv.diffusion_steps),
        sad_candidates=fv.sad_candidates, sad_step=_parse_sad_step(fv.sad_step), mode=mode,
        seed=fv.seed, cfg_schedule=fv.cfg_schedule, batch_size=fv.batch_size,
        progress=lambda line: print(line, flush=True))
    path = write_outputs(result, prompts, fv.out, fv.seed)
    print(f"wrote {len(result.images)} images, grid.png and {os.path.basename(path)} to {fv.out} "
          f"({result.timings['total_s']:.1f}s, {result.timings['images_per_s']:.2f} images/s)", flush=True)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    app.run(main)
