"""Never lose the last good state: corrupted and crafted checkpoints, divergence, full disks, run folders.

Each test reproduces one failure of the reliability issue (numbered as there) on a tiny CPU run; faults come
from engine/faults.py, so nothing depends on timing. docs/reliability.md lists the promise each one backs.
"""
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sslpt.engine import faults
from sslpt.engine.checkpoint import (COMMIT, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     purge, read_commit)
from sslpt.engine.checkpoint_io import SafePlanner, file_digests, verify
from sslpt.engine.cli import main
from sslpt.engine.config import load_config
from sslpt.engine.distributed import shutdown
from sslpt.engine.objectives import build_objective
from sslpt.engine.run_dir import LOCK, RunDirError
from sslpt.engine.train import Trainer, new_run_dir, pretrain

ROOT = Path(__file__).resolve().parent.parent
# 256 synthetic images, 64 per step: 4 steps per epoch
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "train.batch_size=64", "train.log_every=1", "data.synthetic_size=256",
        "train.probe=false", "train.eval_every=0", "data.name=synthetic", "optim.warmup_epochs=1"]


def cfg_for(*extra, objective="hpm"):
    return load_config(f"{objective}_digits", TINY + list(extra))


def records(run_dir, kind=None):
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if kind is None or r["type"] == kind]


def shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def weights(run_dir, cfg):
    objective = build_objective(cfg)
    load_checkpoint(latest_checkpoint(run_dir), objective)
    return objective.state_dict()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run with checkpoints step_4 and step_8 (copy it before damaging it)."""
    run = tmp_path_factory.mktemp("base") / "run"
    pretrain(cfg_for("train.epochs=2"), run_dir=run, show_progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ 1. silent corruption
def corrupt_middle(path: Path, size: int = 64 * 1024) -> None:
    data = bytearray(path.read_bytes())
    size = min(size, len(data) // 2)
    start = (len(data) - size) // 2
    data[start:start + size] = os.urandom(size)
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_never_loaded_and_resume_continues_from_the_last_good(tmp_path, two_epochs, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000008"
    corrupt_middle(shard(newest))
    assert "does not match its sha256" in verify(newest)
    with pytest.raises(CheckpointError, match="failed verification: .*distcp does not match its sha256"):
        load_checkpoint(newest, build_objective(cfg_for()))
    cfg = cfg_for("train.epochs=4")
    pretrain(cfg, run_dir=run, resume=True, show_progress=False)
    assert "skipped checkpoint step_00000008" in capsys.readouterr().err
    resume = records(run, "resume")[-1]
    assert resume["checkpoint"] == "step_00000004" and "step_00000008" in resume["skipped_checkpoints"]
    assert all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] for r in records(run, "train"))
    clean = copy_run(two_epochs, tmp_path / "clean")   # as if the corrupted checkpoint never existed
    shutil.rmtree(clean / "checkpoints" / "step_00000008")
    pretrain(cfg, run_dir=clean, resume=True, show_progress=False)
    a, b = weights(clean, cfg), weights(run, cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupted_checkpoint_never_counts_for_rotation(tmp_path, two_epochs):
    run = copy_run(two_epochs, tmp_path / "run")
    # a third, newer checkpoint that is corrupted: rotation (keep 2) must keep both good ones
    shutil.copytree(run / "checkpoints" / "step_00000008", run / "checkpoints" / "step_00000012")
    corrupt_middle(shard(run / "checkpoints" / "step_00000012"))
    purge(run, keep=2)
    assert (run / "checkpoints" / "step_00000004").is_dir() and (run / "checkpoints" / "step_00000008").is_dir()


def test_commit_records_a_digest_of_every_file(two_epochs):
    newest = latest_checkpoint(two_epochs)
    files = read_commit(newest)["files"]
    assert sorted(files) == sorted(p.name for p in newest.iterdir() if p.name != COMMIT)
    assert files == file_digests(newest) and verify(newest) is None


# ------------------------------------------------------------------ 3. a bad newest checkpoint
DAMAGE = {
    "truncated shard": lambda c: shard(c).write_bytes(shard(c).read_bytes()[:1000]),
    "zero-length shard": lambda c: shard(c).write_bytes(b""),
    "missing shard": lambda c: shard(c).unlink(),
    "truncated metadata": lambda c: (c / ".metadata").write_bytes((c / ".metadata").read_bytes()[:50]),
    "invalid COMMIT": lambda c: (c / COMMIT).write_text('{"next_step": 8, "files": {'),
}
REASON = {"truncated shard": "bytes, COMMIT records", "zero-length shard": "is 0 bytes", "missing shard": "is missing",
          "truncated metadata": ".metadata is", "invalid COMMIT": "not valid JSON"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_newest_checkpoint_falls_back_and_says_why(tmp_path, two_epochs, capsys, damage):
    run = copy_run(two_epochs, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / "step_00000008")
    trainer = Trainer(cfg_for("train.epochs=3"), run_dir=run, resume=True, show_progress=False)
    try:
        assert trainer.next_step == 4
    finally:
        trainer.release()
        shutdown(trainer.dist)
    err = capsys.readouterr().err
    assert "skipped checkpoint step_00000008" in err and REASON[damage] in err and "resuming from step_00000004" in err


@pytest.mark.parametrize("resume", [True, "auto"])
def test_no_checkpoint_verifies_is_one_clear_error_never_a_fresh_start(tmp_path, two_epochs, resume):
    run = copy_run(two_epochs, tmp_path / "run")
    for ckpt in list_checkpoints(run):
        shard(ckpt).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* verifies .*step_00000004: .*"
                                              r"no training was started"):
        Trainer(cfg_for("train.epochs=3"), run_dir=run, resume=resume, show_progress=False)
    assert not (run / LOCK).exists()   # the folder is given back


def test_cli_resume_with_only_bad_checkpoints_is_one_line(tmp_path, two_epochs, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    for ckpt in list_checkpoints(run):
        (ckpt / COMMIT).write_text("not json")
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the 2 checkpoints") and "Traceback" not in "".join(err)


# ------------------------------------------------------------------ 4. loading must not run code
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_crafted_metadata_never_runs_code(tmp_path, two_epochs, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    marker = tmp_path / "code_ran"
    newest = run / "checkpoints" / "step_00000008"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    record = read_commit(newest)
    record["files"] = file_digests(newest)   # whoever crafts the file can rewrite the digests too
    (newest / COMMIT).write_text(json.dumps(record))
    assert "not allowed in checkpoint metadata" in verify(newest)
    with pytest.raises(CheckpointError, match="failed verification: .metadata cannot be read safely"):
        load_checkpoint(newest, build_objective(cfg_for()))
    assert main(["probe", str(run), "--set", "train.probe_max_images=64"]) == 0   # falls back to step_4
    assert "skipped checkpoint step_00000008" in capsys.readouterr().err
    trainer = Trainer(cfg_for("train.epochs=3"), run_dir=run, resume=True, show_progress=False)
    trainer.release()
    shutdown(trainer.dist)
    assert trainer.next_step == 4 and not marker.exists()


def test_small_values_are_loaded_weights_only(tmp_path):
    import io

    marker = tmp_path / "code_ran"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafePlanner().load_bytes(None, buf)
    assert not marker.exists()


# ------------------------------------------------------------------ 2. divergence must not rotate away good state
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_diverging_run_keeps_the_checkpoint_before_its_first_skip(tmp_path, precision, capsys):
    """The update of step 4 leaves NaN weights (as a huge lr does): every later step is skipped. Checkpoints
    taken during the streak are deferred, so step_4 survives, and resuming from it with a sane lr trains on."""
    cfg = cfg_for("train.epochs=4", "train.save_every_steps=2", "train.max_consecutive_skips=3",
                  f"train.precision={precision}")
    with faults.inject(diverge_at_step=4), pytest.raises(FloatingPointError) as err:
        pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)
    assert "step_00000004, is kept" in str(err.value) and "python -m sslpt resume" in str(err.value)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert read_commit(latest_checkpoint(tmp_path / "run"))["consecutive_skips"] == 0
    # (in fp16 the GradScaler's first overflow skips may defer an earlier checkpoint, with nothing kept yet)
    assert records(tmp_path / "run", "checkpoint_deferred")[-1]["kept"] == "step_00000004"
    result = pretrain(cfg_for("train.epochs=4", "optim.blr=1e-4", f"train.precision={precision}"),
                      run_dir=tmp_path / "run", resume=True, show_progress=False)
    after = [r for r in records(tmp_path / "run", "train") if r["step"] > 4][-8:]
    assert result.final_loss == result.final_loss and all(r["max_consecutive_skips"] == 0 for r in after)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000016"


def test_a_huge_lr_then_the_advised_resume_trains_on(tmp_path):
    """optim.blr=1e3 for real: the update of step 1 (finite, destructive) makes every later step non-finite.
    No checkpoint is written during the skips, so step_1 (before that update) and step_2 (after it) are kept;
    the message says to resume with a lower lr and, if that stops again, from the older one; that works."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        pretrain(cfg_for("train.epochs=4", "train.save_every_steps=1", "train.max_consecutive_skips=4",
                         "optim.blr=1e3"), run_dir=run, show_progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    message = str(err.value)
    assert "step_00000002, is kept" in message and f"--checkpoint {run / 'checkpoints' / 'step_00000001'}" in message
    pretrain(cfg_for("train.epochs=4", "optim.blr=1.5e-4"), run_dir=run, resume=run / "checkpoints" / "step_00000001",
             show_progress=False)
    after = records(run, "train")[-15:]   # steps 2..16 of the resumed run
    assert after[-1]["step"] == 16 and all(r["skipped_steps"] == 0 for r in after)


def test_nonfinite_loss_fault_skips_that_step_only(tmp_path):
    with faults.inject(nonfinite_loss_at_step=5):
        pretrain(cfg_for("train.epochs=2"), run_dir=tmp_path / "run", show_progress=False)
    by_step = {r["step"]: r for r in records(tmp_path / "run", "train")}
    assert by_step[6]["skipped_steps"] == 1 and by_step[7]["skipped_steps"] == 0


# ------------------------------------------------------------------ 9. a full disk
def test_disk_full_before_anything_is_one_line_and_leaves_no_empty_config(tmp_path, capsys):
    with faults.inject(disk_full_after_bytes=0):
        rc = main(["pretrain", "hpm_digits", "--quiet", "--run-dir", str(tmp_path / "run"),
                   *[arg for item in TINY + ["train.epochs=1"] for arg in ("--set", item)]])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on") and str(tmp_path / "run") in err
    assert not (tmp_path / "run" / "config.toml").exists() and not (tmp_path / "run" / LOCK).exists()


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    pretrain(cfg_for("train.epochs=1"), run_dir=run, show_progress=False)
    with faults.inject(disk_full_after_bytes=20000), pytest.raises(RunDirError, match="no space left on .*checkpoints"):
        pretrain(cfg_for("train.epochs=2"), run_dir=run, resume=True, show_progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]   # no .partial left
    assert verify(run / "checkpoints" / "step_00000004") is None
    pretrain(cfg_for("train.epochs=2"), run_dir=run, resume=True, show_progress=False)
    assert latest_checkpoint(run).name == "step_00000008"


# ------------------------------------------------------------------ 9. raw tracebacks
def cli_pretrain(tmp_path, *extra) -> int:
    overrides = TINY + ["train.epochs=1", *extra]
    return main(["pretrain", "hpm_digits", "--quiet", "--run-dir", str(tmp_path / "run"),
                 *[arg for item in overrides for arg in ("--set", item)]])


@pytest.mark.parametrize("extra, message", [
    (["data.synthetic_size=16"], "train.batch_size=64 x 1 processes exceeds the 16 training images: lower "
                                 "train.batch_size to at most 16"),
    (["data.name=digits", "model.in_chans=2"], "model.in_chans=2 does not fit data.name='digits'"),
    (["data.name=digits", "model.img_size=4", "model.patch_size=2"], "model.img_size=4 is smaller than"),
])
def test_unfit_settings_are_one_line_errors(tmp_path, capsys, extra, message):
    assert cli_pretrain(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_batchnorm_with_one_image_per_device_is_one_line(tmp_path, capsys):
    # BatchNorm cannot normalise a batch of one in training: torch's error would come from inside a forward
    args = ["train.batch_size=1", "objective.densecl.queue_size=128", "train.epochs=1"]
    assert main(["pretrain", "densecl_digits", "--quiet", "--run-dir", str(tmp_path / "run"),
                 *[arg for item in args for arg in ("--set", item)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.batch_size=1: the densecl networks") and "BatchNorm" in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert cli_pretrain(tmp_path, "train.device=cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.device='cuda' but no CUDA GPU") and "train.device=cpu" in err


# ------------------------------------------------------------------ 7. run folders
def test_run_folder_chooser_never_hands_out_one_folder_twice(tmp_path):
    cfg = cfg_for(f"train.out_dir={json.dumps(str(tmp_path))}")
    chosen, start = [], threading.Barrier(8)

    def choose():
        start.wait()
        chosen.append(new_run_dir(cfg))

    threads = [threading.Thread(target=choose) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(chosen)) == 8 and all(p.is_dir() for p in chosen)


def test_second_run_on_a_locked_folder_is_refused_naming_the_owner(tmp_path):
    cfg = cfg_for("train.epochs=1", f"train.out_dir={json.dumps(str(tmp_path))}", "train.run_name=shared")
    first = Trainer(cfg, show_progress=False)
    try:
        lock = json.loads((tmp_path / "shared" / LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            Trainer(cfg, show_progress=False)
        first.train()
    finally:
        first.release()
        shutdown(first.dist)
    assert not (tmp_path / "shared" / LOCK).exists()
    second = pretrain(cfg_for("train.epochs=2", f"train.out_dir={json.dumps(str(tmp_path))}",
                              "train.run_name=shared"), resume="auto", show_progress=False)
    assert latest_checkpoint(second.run_dir).name == "step_00000008"


def test_stale_lock_of_a_dead_process_is_taken_over_and_said_so(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    pretrain(cfg_for("train.epochs=1"), run_dir=run, show_progress=False)
    assert f"took over the lock of run folder {run} from pid {int(dead.stdout)}" in capsys.readouterr().err
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "another-node", "started": "x"}))
    with pytest.raises(RunDirError, match="in use by pid 1 on host another-node .*delete"):
        pretrain(cfg_for("train.epochs=2"), run_dir=run, resume=True, show_progress=False)


# ------------------------------------------------------------------ fault injection: SIGKILL before COMMIT
def test_sigkill_between_shards_and_commit_resumes_exactly(tmp_path):
    overrides = TINY + ["train.epochs=2", "train.save_every_steps=3", "train.deterministic=true",
                        "train.precision=fp32", "train.cpu_threads=1"]
    args = [sys.executable, "-m", "sslpt", "pretrain", "hpm_digits", "--quiet",
            *[arg for item in overrides for arg in ("--set", item)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(folder, **extra):
        return subprocess.run(args + ["--run-dir", str(folder), "--resume", "auto"], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "broken", SSLPT_FAULTS="kill_before_commit_at_step=6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = tmp_path / "broken" / "checkpoints" / "step_00000006.partial"
    assert any(partial.glob("*.distcp")) and not (partial / COMMIT).exists()
    assert latest_checkpoint(tmp_path / "broken").name == "step_00000004"   # the end of epoch 0
    assert run(tmp_path / "broken").returncode == 0
    assert run(tmp_path / "straight").returncode == 0
    cfg = load_config("hpm_digits", overrides)
    a, b = weights(tmp_path / "straight", cfg), weights(tmp_path / "broken", cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
