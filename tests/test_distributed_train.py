"""FSDP2 and DDP on 2 CPU processes (gloo). Process start-up dominates, so there are three launches: one
mp.spawn pair running four trainings in a row, and two torchrun launches (killed, resumed).

- FSDP2: SIGKILL after the mid-epoch checkpoint of step 6, resume (torchrun, --resume auto) to step 8: every
  step's loss and the final model, EMA teacher, optimizer and trainer state equal the uninterrupted run's;
- DDP gives the same per-step losses and final weights as FSDP2 (HPM: the sharded EMA teacher picks the masks);
- FSDP2 with bf16 (MixedPrecisionPolicy), activation checkpointing, no reshard after forward and accumulation,
  and with fp16 loss scaling (the shard-aware GradScaler) and clipping: runs, finite losses;
- a resume with another world size is refused with a message; rendezvous failures say what to check.
"""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sslpt.engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from sslpt.engine.config import load_config
from sslpt.engine.distributed import DistributedSetupError, init_distributed
from sslpt.engine.objectives import build_objective
from sslpt.engine.train import Trainer, pretrain
from testkit import free_port, spawn_ranks
from test_resume import TINY, _restore_determinism, final_state, kill_and_resume, step_losses  # noqa: F401

FSDP = TINY + ["train.parallel=fsdp", "train.save_every_steps=3"]   # 4 steps per epoch on 2 ranks
MIXED = TINY + ["train.parallel=fsdp", "train.epochs=3", "train.deterministic=false"]
RUNS = {
    "fsdp": FSDP,
    "ddp": TINY + ["train.parallel=ddp"],
    "bf16-ac-accum": MIXED + ["train.precision=bf16", "train.activation_checkpointing=true",
                              "train.reshard_after_forward=false", "train.accum_steps=2", "train.probe=true"],
    "fp16-clip": MIXED + ["train.precision=fp16", "optim.clip_grad=1.0"],
}


def _worker(rank: int, port: int, base: str) -> None:
    """Both ranks run every config of RUNS in one process group (the Trainer uses a group it finds)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, overrides in RUNS.items():
            pretrain(load_config("hpm_digits", overrides), run_dir=Path(base) / name, show_progress=False)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("spawned")
    spawn_ranks(_worker, str(base))
    return base


@pytest.fixture(scope="module")
def fsdp_runs(runs, tmp_path_factory):
    return kill_and_resume(tmp_path_factory.mktemp("fsdp"), FSDP, nproc=2, kill_at=6, total=8,
                           straight=runs / "fsdp")


def test_fsdp_sigkill_mid_epoch_then_resume_is_bit_exact(fsdp_runs):
    straight, broken = fsdp_runs
    newest = latest_checkpoint(broken)
    assert newest.name == "step_00000008"
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]   # one shard a rank


def test_ddp_matches_fsdp(runs):
    fsdp_losses, ddp_losses = step_losses(runs / "fsdp"), step_losses(runs / "ddp")
    assert fsdp_losses.keys() == ddp_losses.keys()
    for step, loss in fsdp_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    fsdp_model, ddp_model = final_state(runs / "fsdp")["model"], final_state(runs / "ddp")["model"]
    assert any(k.startswith("teacher.") for k in fsdp_model)
    for key, value in fsdp_model.items():
        torch.testing.assert_close(ddp_model[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["bf16-ac-accum", "fp16-clip"])
def test_fsdp_mixed_precision_runs(runs, name):
    losses = step_losses(runs / name)
    assert len(losses) == 12 and all(v == v for v in losses.values())   # finite (NaN != NaN)
    # evaluation gathers the shards on every rank (rank 0 draws); the probe runs on a gathered copy on rank 0
    assert (runs / name / "pictures" / "hpm_epoch0003.png").is_file()
    if name == "bf16-ac-accum":
        assert json.loads((runs / name / "probe.json").read_text())["val_images"] > 0


def test_sharded_checkpoint_loads_into_one_process(runs):
    """What `python -m sslpt probe` does with an FSDP run: DCP gathers the 2 ranks' shards into a plain model."""
    objective = build_objective(load_config("hpm_digits", FSDP))
    assert load_checkpoint(latest_checkpoint(runs / "fsdp"), objective)["next_step"] == 8
    reference = final_state(runs / "fsdp")["model"]
    assert all(torch.equal(value, reference[key]) for key, value in objective.state_dict().items())


def test_resume_with_another_world_size_is_refused(runs):
    straight = runs / "fsdp"
    cfg = load_config("hpm_digits", TINY + ["train.epochs=3"])
    with pytest.raises(CheckpointError, match=r"written by 2 processes .* this run has 1 .* same number of processes"):
        Trainer(cfg, run_dir=straight, resume=True, show_progress=False)


def test_unreachable_rendezvous_says_what_to_check(monkeypatch):
    port = free_port()   # nobody listens there
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DistributedSetupError, match=rf"could not join the process group at 127.0.0.1:{port} within "
                                                    r"1 s.*--rdzv-endpoint.*firewall.*train.dist_timeout_s"):
        init_distributed("ddp", "cpu", timeout_s=1)


def test_parallel_none_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DistributedSetupError, match="train.parallel='none' but this is one of 4 processes"):
        init_distributed("none", "cpu", timeout_s=1)
