"""What a run reports: metrics.jsonl, a progress line, TensorBoard events, loss.png."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut short by a kill: everything before it is whole
    return rows


class MetricsLog:
    """Appends one JSON object per line to <run>/metrics.jsonl, and to TensorBoard when the
    tensorboard package is installed. On resume from step S, rows after S (written by the run
    that was killed) are dropped first, so the file reads as one uninterrupted run.
    enabled=False (every rank of a parallel run but the first) writes nothing."""

    def __init__(
        self, run_dir: Path, resume_step: int | None, tensorboard: bool, enabled: bool = True
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.file: TextIO | None = None
        self.writer = None
        if not enabled:
            return
        rows = read_metrics(self.path) if resume_step is not None else []
        rows = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """One line, rewritten in place on a terminal: step, loss, tokens/s, ETA. Off a terminal
    (CI, a log file) a line is printed every `every_s` seconds instead."""

    def __init__(self, total: int, start: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.start = total, start
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last_print = 0.0
        self.every_s = 0.0 if self.tty else 10.0

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_print < self.every_s and step < self.total:
            return
        self.last_print = now
        done = step - self.start
        rate = done / (now - self.started) if done else 0.0
        eta = (self.total - step) / rate if rate else math.inf
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {_duration(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line that must not be overwritten (evaluation results, checkpoints)."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Training (and validation) loss against step as a PNG; False without Pillow."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    points = train + val
    if not points:
        return False
    width, height, left, right, top, bottom = 800, 480, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in points]
    losses = [v for _, v in points if math.isfinite(v)]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses + [0.0]), max(losses + [1e-9])
    y1 += (y1 - y0) * 0.05

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for i in range(6):
        value = y0 + (y1 - y0) * i / 5
        _, y = xy(x0, value)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = x0 + (x1 - x0) * i / 5
        x, _ = xy(step, y0)
        draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 20), "step", fill="black")
    draw.text((left, 12), title or "loss", fill="black")
    for series, colour, label, offset in (
        (train, "#1f77b4", "train", 0),
        (val, "#d62728", "val", 1),
    ):
        clean = [(s, v) for s, v in series if math.isfinite(v)]
        if len(clean) > 1:
            draw.line([xy(s, v) for s, v in clean], fill=colour, width=2)
        for s, v in clean if len(clean) <= 1 or series is val else ():
            x, y = xy(s, v)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if clean:
            lx = width - right - 120
            ly = top + 10 + 16 * offset
            draw.line((lx, ly + 6, lx + 20, ly + 6), fill=colour, width=2)
            draw.text((lx + 26, ly), label, fill="black")
    image.save(path)
    return True
