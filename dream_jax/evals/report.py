"""Evaluation reports: per-step JSON, a merged JSON, a Markdown table and PNG line plots of
metrics over checkpoints (drawn with PIL: matplotlib is not a dependency)."""
from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

EVAL_DIR = "eval"


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, EVAL_DIR)


def write_step(workdir: str, step: int, results: Mapping[str, float], settings: Optional[dict] = None) -> str:
    """Writes ``eval/step_{step:08d}.json`` (merging with metrics already there) and returns its path."""
    d = eval_dir(workdir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step_{int(step):08d}.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    record = {"step": int(step),
              "results": {**old.get("results", {}), **{k: _num(v) for k, v in results.items()}},
              "settings": {**old.get("settings", {}), **(settings or {})}}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def read_all(workdir: str) -> Dict[int, Dict[str, float]]:
    """{step: results} of every ``eval/step_*.json``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(eval_dir(workdir), "step_*.json"))):
        with open(path) as f:
            rec = json.load(f)
        out[int(rec["step"])] = rec["results"]
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}"


def markdown_table(history: Mapping[int, Mapping[str, float]]) -> str:
    """One row per metric, one column per step."""
    steps = sorted(history)
    names = sorted({k for r in history.values() for k in r})
    lines = ["| metric | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(history[s].get(name)) for s in steps) + " |")
    return "\n".join(lines) + "\n"


def probe_comparison(results: Mapping[str, float]) -> str:
    """Markdown table of probe accuracies of the model vs its baselines (pixels, random_init):
    one row per (probe, task), one column per representation."""
    rows: Dict[tuple, Dict[str, float]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if parts[0] == "linear_probe" and "train_acc" not in parts:
            row, variant = ("linear probe", parts[1]), (parts[2] if len(parts) > 2 else "model")
        elif parts[0] == "few_shot" and len(parts) >= 3:
            row, variant = (f"{parts[2]}", parts[1]), (parts[3] if len(parts) > 3 else "model")
        else:
            continue
        rows.setdefault(row, {})[variant] = value
    if not rows:
        return ""
    variants = ["model"] + sorted({v for r in rows.values() for v in r} - {"model"})
    lines = ["| probe | task | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]

    def order(row):
        probe, task = row
        shots = int(probe[:-4]) if probe.endswith("shot") and probe[:-4].isdigit() else 10**6
        return (shots, probe, task)

    for row in sorted(rows, key=order):
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(_fmt(rows[row].get(v)) for v in variants) + " |")
    return "\n".join(lines) + "\n"


def write_summary(workdir: str, plots: bool = True) -> dict:
    """Writes ``eval/results.json`` ({step: results}), ``eval/results.md`` and, with two or more
    steps, ``eval/plots/<group>.png`` (group = the metric name up to its first '/').
    Returns {'json': path, 'markdown': path, 'plots': [paths]}."""
    history = read_all(workdir)
    d = eval_dir(workdir)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({str(s): history[s] for s in sorted(history)}, f, indent=2, sort_keys=True)
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write(f"# Evaluation of {os.path.abspath(workdir)}\n\n")
        f.write(markdown_table(history))
        if history:
            comparison = probe_comparison(history[max(history)])
            if comparison:
                f.write(f"\n## Probes vs baselines (step {max(history)})\n\n" + comparison)
    paths = []
    if plots and len(history) >= 2:
        groups: Dict[str, List[str]] = {}
        for name in sorted({k for r in history.values() for k in r}):
            groups.setdefault(name.split("/")[0], []).append(name)
        os.makedirs(os.path.join(d, "plots"), exist_ok=True)
        steps = sorted(history)
        for group, names in groups.items():
            series = {n: [(s, history[s].get(n)) for s in steps] for n in names}
            path = os.path.join(d, "plots", re.sub(r"[^A-Za-z0-9_.-]", "_", group) + ".png")
            line_plot(series, path, title=f"{group} over checkpoints")
            paths.append(path)
    return {"json": os.path.join(d, "results.json"), "markdown": os.path.join(d, "results.md"),
            "plots": paths}


# =============================================================================================
# A small PIL line plot.
# =============================================================================================
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(series: Mapping[str, Sequence], path: str, title: str = "", size=(900, 520),
              max_legend: int = 24) -> None:
    """Writes a PNG with one polyline per series ({name: [(x, y or None), ...]})."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = size
    legend_w = 300
    left, right, top, bottom = 70, legend_w + 20, 36, 46
    img = Image.new("RGB", (w + legend_w, h), "white")
    draw = ImageDraw.Draw(img)
    pts = [(float(x), float(y)) for s in series.values() for x, y in s if y is not None]
    if not pts:
        draw.text((left, top), "no data", fill="black", font=font)
        img.save(path)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - max(abs(y0) * 0.1, 1e-3), y1 + max(abs(y1) * 0.1, 1e-3)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = w + legend_w - left - right, h - top - bottom

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph)

    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in _ticks(y0, y1):
        _, py = to_px(x0, t)
        draw.line([left, py, left + pw, py], fill=(230, 230, 230))
        draw.text((5, py - 6), f"{t:.4g}", fill="black", font=font)
    for t in _ticks(x0, x1):
        px, _ = to_px(t, y0)
        draw.line([px, top + ph, px, top + ph + 4], fill="black")
        draw.text((px - 12, top + ph + 8), f"{t:.6g}", fill="black", font=font)
    draw.text((left + pw // 2 - 20, h - 18), "step", fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = [to_px(float(x), float(y)) for x, y in s if y is not None]
        if len(line) >= 2:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        if i < max_legend:
            ly = top + 14 * i
            lx = left + pw + 12
            draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colour, width=3)
            draw.text((lx + 24, ly), name[-44:], fill="black", font=font)
    img.save(path)


def plot_has_line(path: str, colour=_COLOURS[0]) -> int:
    """Number of pixels of ``colour`` in a plot (used by tests to see that a line was drawn)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return int(np.all(arr == np.asarray(colour, np.uint8), axis=-1).sum())
