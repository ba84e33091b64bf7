"""Training curves as one PNG, drawn with PIL (no plotting dependency): a small chart per quantity, one line
per run, read from each run's metrics.jsonl. ``python -m sslpt plot RUN [RUN ...]`` overlays runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# (record type, key, chart title); charts without data in any run are left out
SERIES = (
    ("train", "loss", "train loss"),
    ("eval", "val_loss_rec", "val reconstruction loss"),
    ("eval", "spearman_student", "Spearman, student"),
    ("eval", "spearman_teacher", "Spearman, teacher"),
    ("eval", "num_hard", "hard patches K"),
    ("eval", "recon_accuracy", "digits read from reconstructions"),
    ("train", "lr", "learning rate"),
    ("train", "img_per_s", "images / s"),
)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
CHART_W, CHART_H, MARGIN, COLUMNS = 300, 170, 40, 3


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a crash is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a run folder?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """(epoch, value) points: train records at their fractional epoch, eval records at the epoch they end.
    A resumed run logs some steps twice: the later record of a step wins."""
    points: dict[float, float] = {}
    for r in records:
        if r.get("type") != kind or not isinstance(r.get(key), (int, float)) or not math.isfinite(r[key]):
            continue
        if kind == "train" and r.get("steps_per_epoch"):
            x = r["step"] / r["steps_per_epoch"]
        else:
            x = float(r.get("epoch", 0))
        points[x] = float(r[key])
    return sorted(points.items())


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _chart(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str, lines: list[list[tuple[float, float]]],
           font) -> None:
    draw.text((x0 + MARGIN, y0 + 2), title, fill=(0, 0, 0), font=font)
    left, top, right, bottom = x0 + MARGIN, y0 + 16, x0 + CHART_W - 8, y0 + CHART_H - 18
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    points = [p for line in lines for p in line]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or abs(y_hi) or 1.0
    draw.text((x0 + 2, top), _label(y_hi), fill=(90, 90, 90), font=font)
    draw.text((x0 + 2, bottom - 10), _label(y_lo), fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 3), f"epoch {_label(x_lo)}", fill=(90, 90, 90), font=font)
    end = _label(x_hi)
    draw.text((right - draw.textlength(end, font=font), bottom + 3), end, fill=(90, 90, 90), font=font)
    for colour, line in zip(COLOURS * 10, lines):
        xy = [(left + (x - x_lo) / x_span * (right - left), bottom - (y - y_lo) / y_span * (bottom - top))
              for x, y in line]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        elif xy:
            draw.line(xy, fill=colour, width=2)


def plot_runs(run_dirs: list[Path], out_path: Path, names: list[str] | None = None) -> Path:
    """One chart per quantity that any run logged, one line per run; a legend when several runs."""
    runs = [read_records(d) for d in run_dirs]
    names = names or [Path(d).name for d in run_dirs]
    charts = []
    for kind, key, title in SERIES:
        lines = [series(records, kind, key) for records in runs]
        if any(lines):
            charts.append((title, lines))
    if not charts:
        raise ValueError(f"no metrics to plot in {', '.join(map(str, run_dirs))}")
    rows = math.ceil(len(charts) / COLUMNS)
    legend = 14 * len(runs) + 6 if len(runs) > 1 else 0
    canvas = Image.new("RGB", (COLUMNS * CHART_W, rows * CHART_H + legend), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (title, lines) in enumerate(charts):
        _chart(draw, (i % COLUMNS) * CHART_W, (i // COLUMNS) * CHART_H, title, lines, font)
    for i, (name, colour) in enumerate(zip(names, COLOURS * 10)):
        y = rows * CHART_H + 4 + 14 * i
        if len(runs) > 1:
            draw.rectangle((MARGIN, y + 3, MARGIN + 16, y + 7), fill=colour)
            draw.text((MARGIN + 22, y), name, fill=(0, 0, 0), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
    return out_path
