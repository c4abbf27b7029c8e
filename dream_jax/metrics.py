"""Metric writing: JSONL (one object per line) and TensorBoard event files, plus a progress line.

clu's metric writers import TensorFlow, which we do not install; tensorboardX
writes the same event files without it.
"""
import json
import os
import sys
import time

import numpy as np


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.size == 1 else None


class MetricWriter:
    """Writes scalars to <workdir>/metrics.jsonl and TensorBoard; images as PNG + TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

    def _board(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        return self._tb

    def write_scalars(self, step: int, scalars: dict):
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in scalars.items()}
        clean = {k: v for k, v in clean.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        board = self._board()
        for k, v in clean.items():
            board.add_scalar(k, v, int(step))

    def write_image(self, step: int, name: str, image: np.ndarray):
        """image: uint8 [H, W, 3]; also saved as <workdir>/images/<name>_<step>.png."""
        if not self.enabled:
            return
        from PIL import Image
        folder = os.path.join(self.workdir, "images")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(folder, f"{name}_{int(step):08d}.png"))
        self._board().add_image(name, np.asarray(image, np.uint8), int(step), dataformats="HWC")

    def flush(self):
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """A one-line progress report with rate and ETA."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, stream=sys.stdout):
        self.total = total_steps
        self.start_step = start_step
        self.batch_size = batch_size
        self.stream = stream
        self.t0 = None
        self.last_t = None
        self.last_step = start_step

    def start(self, step: int):
        """Call once the first step (which includes compilation) has finished."""
        self.t0 = self.last_t = time.time()
        self.last_step = step

    def rates(self, step: int):
        """(steps/s, images/s) since the last call."""
        now = time.time()
        dt = max(now - self.last_t, 1e-9)
        steps = step - self.last_step
        self.last_t, self.last_step = now, step
        return steps / dt, steps * self.batch_size / dt

    def line(self, step: int, metrics: dict, steps_per_s: float) -> str:
        remaining = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if np.isfinite(remaining) else "?"
        parts = [f"step {step}/{self.total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
        for key in ("gen_loss", "clip_loss"):
            if key in metrics:
                parts.append(f"{key.split('_')[0]} {metrics[key]:.4f}")
        parts.append(f"{metrics.get('images_per_s', 0):.0f} img/s")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)

    def print(self, step, metrics, steps_per_s):
        print(self.line(step, metrics, steps_per_s), file=self.stream, flush=True)
