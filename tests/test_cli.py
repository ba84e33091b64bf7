"""What the user runs: the CLI (`python -m sslpt ...`) and the README's commands."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslpt.engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "model.embed_dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
        "--set", "model.decoder_dim=16", "--set", "model.decoder_depth=1", "--set", "model.decoder_heads=2",
        "--set", "train.batch_size=128", "--set", "train.epochs=2"]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_help_explains_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("pretrain", "resume", "probe", "--set", "hpm_digits"):
        assert word in out.stdout
    assert run_cli("pretrain", "--help").returncode == 0


def test_presets_lists_every_config_with_its_objective_in_two_columns(capsys):
    from sslpt.engine.config import CONFIG_DIR

    assert main(["presets"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert all(len(row) == 2 for row in rows)   # long names never run into the objective's
    assert [name for name, _ in rows] == sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert ["mokd_resnet50_vit_small_100ep", "mokd"] in rows


def test_config_typo_fails_before_training(capsys):
    assert main(["pretrain", "hpm_digits", "--set", "train.epoch=3"]) == 2
    assert "unknown config key train.epoch (did you mean train.epochs?)" in capsys.readouterr().err
    assert main(["pretrain", "hpm_digits", "--set", "model.patch_size=3"]) == 2
    assert main(["pretrain", "no_such_config"]) == 2


def test_missing_image_folder_says_so(capsys, tmp_path):
    code = main(["pretrain", "hpm_digits", "--set", "data.name=folder", "--set", f"data.path={tmp_path / 'nope'}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_and_launch_mistakes_fail_with_a_message(capsys, tmp_path):
    assert main(["pretrain", "hpm_digits", "--resume", "auto"]) == 2
    assert "--resume auto needs a fixed run folder" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nope")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    for name in ("COMMIT", ".metadata"):
        (tmp_path / "run" / "checkpoints" / "step_00000004" / name).write_text("{}")
    assert main(["pretrain", "hpm_digits", "--run-dir", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints (newest: step_00000004)" in capsys.readouterr().err
    assert main(["pretrain", "hpm_digits", "--run-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "x")]) == 2
    assert "checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_probe_resume_end_to_end(tmp_path):
    """The demo's command line with a tiny model: run folder, probe output, resume, probe command."""
    run_dir = tmp_path / "run"
    out = run_cli("pretrain", "hpm_digits", *TINY, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "linear probe, cls token" in out.stdout and "random init" in out.stdout and str(run_dir) in out.stdout
    probe = json.loads((run_dir / "probe.json").read_text())
    assert 0.1 < probe["linear_cls_pretrained"] <= 1.0 and probe["val_images"] == 359
    assert probe["shots"] == 5 and 0.0 < probe["few_shot_mean_random"] <= 1.0
    assert "linear probe, 5 labels/class, mean" in out.stdout
    pictures = sorted(p.name for p in (run_dir / "pictures").iterdir())   # after epoch 1 and at the end
    assert pictures == ["hard_positions_epoch0001.png", "hard_positions_epoch0002.png", "hpm_epoch0001.png",
                        "hpm_epoch0002.png", "recon_epoch0001.png", "recon_epoch0002.png"]
    assert (run_dir / "curves.png").is_file()
    assert probe["objective"] == "hpm" and "L-BFGS" in probe["protocol"]["linear"]
    # on digits each evaluation reports how many reconstructions a classifier of real digits still reads
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"type": "eval"' in line]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert all(0 <= e["recon_accuracy"] <= 1 and e["recon_accuracy_originals"] > 0.8 for e in evals)
    out = run_cli("resume", str(run_dir), "--set", "train.epochs=3", "--set", "train.probe=false")
    assert out.returncode == 0, out.stderr
    assert "epoch 3/3" in out.stderr
    out = run_cli("probe", str(run_dir), "--set", "train.probe_shots=0")
    assert out.returncode == 0, out.stderr
    assert "kNN (k=20), mean of patch tokens" in out.stdout and "labels/class" not in out.stdout
    assert json.loads((run_dir / "probe.json").read_text())["val_images"] == 359
