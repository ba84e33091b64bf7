"""Exact resume after SIGKILL, and checkpoints that fail safely (DCP folders with a commit marker).

The kill test runs training in a subprocess that SIGKILLs itself right after the checkpoint of step K is
committed (no clean exit, no flush), resumes it with ``--resume auto``, and asserts that every step's loss
and the final model, EMA teacher, optimizer and trainer state equal an uninterrupted run's, bit for bit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslpt.engine.checkpoint import (COMMIT, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                               purge)
from sslpt.engine.config import load_config
from sslpt.engine.objectives import build_objective
from sslpt.engine.train import Trainer, pretrain

ROOT = Path(__file__).resolve().parent.parent
# 64 synthetic images, 8 per rank-step: 8 steps per epoch on one process, 4 per epoch on two
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "data.name=synthetic", "data.synthetic_size=64", "train.batch_size=8",
        "train.epochs=2", "train.log_every=1", "train.eval_every=0", "train.probe=false", "train.cpu_threads=1",
        "train.precision=fp32", "train.deterministic=true", "optim.warmup_epochs=1", "optim.blr=1e-3"]

WORKER = '''
import os, signal, sys
from sslpt.engine.cli import main
from sslpt.engine.train import Trainer

kill_at = int(os.environ.get("KILL_AFTER_SAVE_AT_STEP", "0"))
if kill_at:
    save = Trainer.save

    def save_then_die(self):
        path = save(self)
        if self.next_step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # no clean exit: nothing after the commit runs
        return path

    Trainer.save = save_then_die
sys.exit(main(sys.argv[1:]))
'''


def launch(tmp_path: Path, run_dir: Path, overrides: list[str], nproc: int = 1, kill_at: int = 0,
           resume: bool = False) -> subprocess.CompletedProcess:
    """`python -m sslpt pretrain` (under torchrun with `nproc` > 1), optionally killed after a save."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = ["pretrain", "hpm_digits", "--quiet", "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args += ["--resume", "auto"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AFTER_SAVE_AT_STEP": str(kill_at), "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [str(script)] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def final_state(run_dir: Path) -> dict:
    """Everything in the newest checkpoint, gathered into one process (DCP reshards any world size)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir.parent / f"{run_dir.name}.pt"
    dcp_to_torch_save(latest_checkpoint(run_dir), out)
    state = torch.load(out, weights_only=False)
    trainer = json.loads(state.pop("trainer"))
    trainer.pop("saved_at")
    return {"trainer": trainer, **state}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["trainer"] == b["trainer"]
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), key
        else:
            assert value == flat_b[key], key


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        return {f"{prefix}{i}": v for i, v in enumerate(tree)}
    return {prefix: tree}


def kill_and_resume(tmp_path: Path, overrides: list[str], nproc: int, kill_at: int, total: int,
                    straight: Path | None = None):
    """(straight run dir, killed-and-resumed run dir), after checking the kill really happened. ``straight``:
    an uninterrupted run made elsewhere with the same overrides, else one is launched here."""
    broken = tmp_path / "broken"
    if straight is None:
        straight = tmp_path / "straight"
        out = launch(tmp_path, straight, overrides, nproc)
        assert out.returncode == 0, out.stderr[-3000:]
    out = launch(tmp_path, broken, overrides, nproc, kill_at=kill_at)
    # killed by SIGKILL: directly, or under torchrun, which reports the signal of its dead worker
    assert out.returncode == -9 or "SIGKILL" in out.stderr, (out.returncode, out.stderr[-3000:])
    assert max(step_losses(broken)) == kill_at
    assert read_next_step(latest_checkpoint(broken)) == kill_at
    out = launch(tmp_path, broken, overrides, nproc, resume=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = step_losses(straight), step_losses(broken)
    assert sorted(a) == list(range(1, total + 1)) and a == b   # every step's loss, bit for bit
    assert_same_state(final_state(straight), final_state(broken))
    return straight, broken


def read_next_step(path: Path) -> int:
    return json.loads((path / COMMIT).read_text())["next_step"]


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Runs with train.deterministic=true switch deterministic algorithms on for the whole process."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


# ------------------------------------------------------------------------------------------- single process
@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """HPM (EMA teacher, hard-patch masks) with mid-epoch checkpoints every 3 steps, killed after step 12."""
    tmp_path = tmp_path_factory.mktemp("none")
    overrides = TINY + ["train.save_every_steps=3"]
    return kill_and_resume(tmp_path, overrides, nproc=1, kill_at=12, total=16)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(killed_run):
    straight, broken = killed_run
    # epoch ends (8, 16) and every 3 steps; keep_checkpoints = 2
    assert [p.name for p in list_checkpoints(broken)] == ["step_00000015", "step_00000016"]


def test_checkpoint_of_another_model_shape_is_refused(killed_run):
    _, broken = killed_run
    cfg = load_config("hpm_digits", TINY + ["model.embed_dim=64"])
    with pytest.raises(CheckpointError, match=r"another model: .*differ in shape .*config the run was started"):
        load_checkpoint(latest_checkpoint(broken), build_objective(cfg))


def test_weights_load_into_a_plain_model(killed_run):
    straight, _ = killed_run
    cfg = load_config("hpm_digits", TINY)
    objective = build_objective(cfg)
    state = load_checkpoint(latest_checkpoint(straight), objective)
    assert state["next_step"] == 16
    reference = final_state(straight)["model"]
    assert all(torch.equal(v, reference[k]) for k, v in objective.state_dict().items())


# ------------------------------------------------------------------------------------------- fail safely
def make_checkpoint_folder(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"x")
    if complete:
        (path / COMMIT).write_text("{}")
    return path


def test_only_committed_checkpoints_count_and_purge_keeps_the_newest(tmp_path):
    for step in (3, 6, 9):
        make_checkpoint_folder(tmp_path, step)
    make_checkpoint_folder(tmp_path, 12, complete=False)       # died before the commit marker
    (tmp_path / "checkpoints" / "step_00000004.partial").mkdir()   # died mid-save, older than the newest
    (tmp_path / "checkpoints" / "step_00000010.partial").mkdir()   # a newer save in flight: not touched
    assert latest_checkpoint(tmp_path).name == "step_00000009"
    purge(tmp_path, keep=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000006", "step_00000009", "step_00000010.partial", "step_00000012"]


def tiny_cfg(*extra):
    return load_config("hpm_digits", TINY + ["train.epochs=1", *extra])


def test_fresh_run_never_overwrites_checkpoints(tmp_path):
    make_checkpoint_folder(tmp_path / "run", 5)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest: step_00000005\).*--resume auto"):
        Trainer(tiny_cfg(), run_dir=tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step_00000005" / COMMIT).is_file()


def test_missing_or_incomplete_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from .*--resume auto"):
        Trainer(tiny_cfg(), run_dir=tmp_path / "empty", resume=True, show_progress=False)
    with pytest.raises(CheckpointError, match="does not exist.*--resume auto"):
        Trainer(tiny_cfg(), run_dir=tmp_path / "a", resume=tmp_path / "nope" / "step_00000001", show_progress=False)
    half = make_checkpoint_folder(tmp_path / "b", 2, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Trainer(tiny_cfg(), run_dir=tmp_path / "b", resume=half, show_progress=False)


def test_resume_auto_without_checkpoint_starts_fresh_and_save_every_steps(tmp_path):
    result = pretrain(tiny_cfg("train.save_every_steps=3", "train.deterministic=false"), run_dir=tmp_path / "r",
                      resume="auto", show_progress=False)
    assert result.final_loss == result.final_loss
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step_00000006", "step_00000008"]
