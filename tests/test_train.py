"""End-to-end runs of the training loop on tiny models (CPU, a few seconds each)."""
import json

import pytest
import torch

from engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from engine.config import load_config
from engine.train import pretrain

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "train.batch_size=64", "train.log_every=5", "data.synthetic_size=256",
        "train.probe=false", "train.eval_every=0", "data.name=synthetic"]


def cfg_for(objective="hpm", *extra):
    return load_config(f"{objective}_digits", TINY + list(extra))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["hpm", "mae"])
def test_short_run_learns(tmp_path, objective):
    cfg = cfg_for(objective, "train.epochs=6", "optim.warmup_epochs=1", "train.eval_every=3")
    result = pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)
    records = read_metrics(result.run_dir)
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["loss_rec"] < 0.8 * train[0]["loss_rec"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [2, 5]
    assert (result.run_dir / "config.toml").is_file()
    assert len(list_checkpoints(result.run_dir)) == 2    # keep_checkpoints = 2
    assert (result.run_dir / "pictures" / "recon_epoch0006.png").is_file()
    if objective == "hpm":
        assert (result.run_dir / "pictures" / "hpm_epoch0006.png").is_file()
        assert "spearman_teacher" in evals[-1] and "loss_pred" in train[-1]


def params_hash(run_dir):
    state = load_checkpoint(latest_checkpoint(run_dir))["objective"]
    return {k: v.clone() for k, v in state.items()}


def test_resume_neither_skips_nor_repeats_an_epoch(tmp_path):
    """2 epochs, then resume to 4 == 4 epochs straight, bit for bit (HPM's official resume skips one)."""
    straight = pretrain(cfg_for("hpm", "train.epochs=4"), run_dir=tmp_path / "a", show_progress=False)
    pretrain(cfg_for("hpm", "train.epochs=4", "train.save_every=2"), run_dir=tmp_path / "b", show_progress=False)
    # simulate a crash after epoch 2: drop the later checkpoint, then resume
    (tmp_path / "b" / "checkpoints" / "epoch_0003.pt").unlink()
    assert load_checkpoint(latest_checkpoint(tmp_path / "b"))["epoch"] == 1
    resumed = pretrain(cfg_for("hpm", "train.epochs=4"), run_dir=tmp_path / "b", resume=True, show_progress=False)
    a, b = params_hash(straight.run_dir), params_hash(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_a = [r["step"] for r in read_metrics(tmp_path / "a") if r["type"] == "train"]
    steps_b = [r["step"] for r in read_metrics(tmp_path / "b") if r["type"] == "train"]
    # run b logged epochs 0-3, then again epochs 2-3 after the resume
    assert steps_b == steps_a + steps_a[len(steps_a) // 2:]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pretrain(cfg_for("hpm", "train.epochs=1"), run_dir=tmp_path / "empty", resume=True, show_progress=False)


def test_half_written_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 0, {"epoch": 0})
    (tmp_path / "checkpoints" / "epoch_0001.pt.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "epoch_0000.pt"
    for epoch in range(1, 4):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0002.pt", "epoch_0003.pt"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    result = pretrain(cfg_for("hpm", "train.epochs=1", f"train.precision={precision}"), run_dir=tmp_path / precision,
                      show_progress=False)
    assert result.final_loss == result.final_loss  # finite (NaN != NaN)


def test_nan_loss_stops_with_checkpoint_kept(tmp_path, monkeypatch):
    from engine.objectives.hpm import HPM

    forward = HPM.forward

    def poisoned(self, imgs, ctx):
        loss, metrics = forward(self, imgs, ctx)
        return (loss * float("nan") if ctx.epoch == 1 else loss), metrics

    monkeypatch.setattr(HPM, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 1"):
        pretrain(cfg_for("hpm", "train.epochs=3"), run_dir=tmp_path / "nan", show_progress=False)
    assert load_checkpoint(latest_checkpoint(tmp_path / "nan"))["epoch"] == 0
