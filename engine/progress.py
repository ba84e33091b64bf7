"""A one-line progress display: step, loss, img/s, MFU (on GPU) and ETA."""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Redraws one line on a terminal; prints one line per update elsewhere (logs, CI)."""

    def __init__(self, total_steps: int, stream=None, enabled: bool = True, start_step: int = 0):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.start_step = start_step

    def update(self, step: int, epoch: int, epochs: int, fields: dict[str, str]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        pct = 100.0 * step / max(self.total, 1)
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        line = f"epoch {epoch + 1}/{epochs} step {step}/{self.total} ({pct:4.1f}%) {text} ETA {format_duration(eta)}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
