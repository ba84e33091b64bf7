"""Progress line and metric windows: step, loss, img/s per device, MFU, peak memory, skipped steps, ETA.

Per-step values are summed on the device; a log line costs one host sync and, under torchrun, one
all-reduce, whatever the number of steps in between.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

# dense bf16 tensor-core peaks (TFLOP/s) for MFU; other devices report achieved TFLOP/s only
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class MetricWindow:
    """Sums of the finite per-step metrics, skipped/non-finite step counts and images since the last flush.

    ``skipped`` counts optimizer steps not applied (non-finite gradients, including fp16 loss-scale
    overflows); ``nonfinite`` counts steps the ``fail`` policy treats as fatal; ``max_run`` is the longest run of
    consecutive skipped steps that touched this window.
    """

    def __init__(self, device: torch.device, world_size: int = 1, flops_per_image: float = 0.0):
        self.device, self.world_size, self.flops = device, world_size, flops_per_image
        self.peak = peak_tflops(device)
        self.run = torch.zeros((), device=device)   # current run of consecutive skipped steps
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.finite, self.steps, self.skipped, self.nonfinite = zero.clone(), 0, zero.clone(), zero.clone()
        self.max_run = self.run.clone()
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], images: int,
            skipped: torch.Tensor | None = None, nonfinite: torch.Tensor | None = None) -> None:
        ok = torch.isfinite(loss.detach().float())
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float()
            self.sums[key] = self.sums.get(key, 0.0) + torch.where(ok, value, torch.zeros_like(value))
        self.finite += ok
        self.steps += 1
        self.images += images
        if skipped is not None:
            self.skipped += skipped
            self.run = (self.run + skipped) * skipped   # +1 while skipping, back to 0 on an applied step
            self.max_run = torch.maximum(self.max_run, self.run)
        if nonfinite is not None:
            self.nonfinite += nonfinite

    def flush(self) -> dict:
        """Averages over finite steps (and over ranks), counts, img/s per device, TFLOP/s, MFU, peak memory."""
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k] for k in keys] + [self.finite, self.skipped, self.nonfinite])
        if self.world_size > 1:
            dist.all_reduce(local)
            run = self.max_run.clone()
            dist.all_reduce(run, op=dist.ReduceOp.MAX)
        else:
            run = self.max_run
        values = local.tolist() + [float(run)]   # the one host sync of the window
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        finite = values[len(keys)]
        record = {k: (v / finite if finite else float("nan")) for k, v in zip(keys, values)}
        record["skipped_steps"] = int(values[len(keys) + 1] / self.world_size)
        record["nonfinite_steps"] = math.ceil(values[len(keys) + 2] / self.world_size)   # counted per rank
        record["max_consecutive_skips"] = int(values[-1])
        record["img_per_s_per_device"] = self.images / elapsed
        record["img_per_s"] = record["img_per_s_per_device"] * self.world_size
        if self.flops:
            record["tflops_per_device"] = self.flops * record["img_per_s_per_device"] / 1e12
            if self.peak:
                record["mfu"] = record["tflops_per_device"] / self.peak
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset()
        return record


def progress_fields(record: dict) -> dict[str, str]:
    """The short fields of a metrics record shown on the progress line."""
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
             "img/s/dev": f"{record['img_per_s_per_device']:.0f}"}
    if "mfu" in record:
        shown["MFU"] = f"{100 * record['mfu']:.1f}%"
    elif "tflops_per_device" in record:
        shown["TFLOP/s"] = f"{record['tflops_per_device']:.2f}"
    if "peak_mem_gib" in record:
        shown["mem"] = f"{record['peak_mem_gib']:.1f}GiB"
    if record.get("skipped_steps"):
        shown["skipped"] = str(record["skipped_steps"])
    return shown


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
