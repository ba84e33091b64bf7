"""Curves drawn from metrics.jsonl, the plot command, and the optional TensorBoard logger."""
import json

import pytest
from PIL import Image

from sslpt.engine.cli import main
from sslpt.engine.curves import CHART_H, COLUMNS, CHART_W, plot_runs, read_records, series
from sslpt.engine.loggers import Loggers


def write_run(folder, records):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"type\": \"train\", \"lo")   # a torn last line
    return folder


RECORDS = [
    {"type": "train", "epoch": 1, "step": 5, "steps_per_epoch": 10, "loss": 1.0, "lr": 1e-4, "img_per_s": 100.0},
    {"type": "train", "epoch": 1, "step": 10, "steps_per_epoch": 10, "loss": 0.8, "lr": 2e-4, "img_per_s": 110.0},
    {"type": "eval", "epoch": 1, "val_loss_rec": 0.7, "spearman_student": 0.3, "num_hard": 0},
    {"type": "train", "epoch": 2, "step": 15, "steps_per_epoch": 10, "loss": float("nan"), "lr": 3e-4},
    {"type": "resume", "step": 10},
    {"type": "train", "epoch": 2, "step": 15, "steps_per_epoch": 10, "loss": 0.6, "lr": 3e-4},
    {"type": "eval", "epoch": 2, "val_loss_rec": 0.5, "spearman_student": 0.6, "num_hard": 3},
]


def test_series_one_point_per_step_later_record_wins(tmp_path):
    records = read_records(write_run(tmp_path / "run", RECORDS))
    assert series(records, "train", "loss") == [(0.5, 1.0), (1.0, 0.8), (1.5, 0.6)]
    assert series(records, "eval", "spearman_student") == [(1.0, 0.3), (2.0, 0.6)]


def test_plot_runs_draws_a_chart_per_logged_quantity(tmp_path):
    a = write_run(tmp_path / "hpm", RECORDS)
    b = write_run(tmp_path / "mae", [r for r in RECORDS if "spearman_student" not in r])
    out = plot_runs([a, b], tmp_path / "curves.png")
    with Image.open(out) as img:
        charts = 6   # loss, val loss, student Spearman, K, lr, img/s (no teacher Spearman logged)
        rows = -(-charts // COLUMNS)
        assert img.size == (COLUMNS * CHART_W, rows * CHART_H + 14 * 2 + 6)


def test_plot_command(tmp_path, capsys):
    a = write_run(tmp_path / "run_a", RECORDS)
    assert main(["plot", str(a), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file() and str(tmp_path / "c.png") in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_tensorboard_events_are_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = Loggers(("jsonl", "tensorboard"), tmp_path, {})
    loggers.record({"type": "train", "step": 3, "loss": 0.5, "lr": 1e-3}, step=3)
    loggers.record({"type": "eval", "epoch": 1, "spearman_teacher": 0.25, "note": "text"}, step=3)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "p.png")
    loggers.image("pictures/recon", tmp_path / "p.png", step=3)
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/spearman_teacher"} <= set(events.Tags()["scalars"])
    assert events.Scalars("train/loss")[0].value == pytest.approx(0.5) and events.Scalars("train/loss")[0].step == 3
    assert events.Tags()["images"] == ["pictures/recon"]


def test_unknown_or_missing_logger_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train.loggers"):
        Loggers(("csv",), tmp_path, {})
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="pip install wandb"):
        Loggers(("wandb",), tmp_path, {})


@pytest.mark.slow
def test_a_run_logs_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslpt.engine.config import load_config
    from sslpt.engine.train import pretrain

    tiny = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16",
            "model.decoder_depth=1", "model.decoder_heads=2", "train.epochs=2", "train.eval_every=1",
            "train.probe=false", "data.name=synthetic", "data.synthetic_size=64", "train.batch_size=32",
            'train.loggers=["jsonl", "tensorboard"]']
    run = pretrain(load_config("hpm_digits", tiny), run_dir=tmp_path / "run", show_progress=False)
    events = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "eval/val_loss_rec", "eval/num_hard"} <= set(events.Tags()["scalars"])
    assert {"pictures/recon", "pictures/hpm", "pictures/curves"} <= set(events.Tags()["images"])
    assert len(events.Scalars("eval/val_loss_rec")) == 2
