"""Fine-tuning on 2 CPU processes (gloo, DDP), RandAugment and random erasing on: one mp.spawn pair runs an
uninterrupted 2-epoch fine-tuning and the same run stopped right after its epoch-1 checkpoint and resumed
(``--resume auto``) in a new FineTuner. Checked: both ranks end with the same weights, each rank gets
batch / world images a step (disjoint slices of the global batch), and the resumed run's weights and history
equal the uninterrupted run's bit for bit."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sslpt.engine.config import load_config
from sslpt.engine.export import encoder_from_file, save_encoder
from sslpt.engine.finetune import FinetuneSettings, FineTuner
from sslpt.engine.models.vit import VisionTransformer
from testkit import spawn_ranks

CFG = ["model.img_size=8", "model.patch_size=2", "model.in_chans=1", "model.embed_dim=32", "model.depth=2",
       "model.num_heads=2", "train.precision=\"fp32\"", "train.cpu_threads=1", "train.parallel=\"ddp\""]
SETTINGS = dict(epochs=2, warmup_epochs=1, batch_size=128, blr=1e-3, layer_decay=0.75, drop_path=0.1)


class _Stop(Exception):
    pass


def _worker(rank: int, port: int, base: str, encoder_file: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg, s, base = load_config(None, CFG), FinetuneSettings(**SETTINGS), Path(base)
        full = FineTuner(cfg, encoder_from_file(encoder_file)[0], s, base / "full", show_progress=False)
        info = {"per_rank_batch": full.data.batch_size, "steps_per_epoch": full.data.steps_per_epoch,
                "first_step_indices": full.data.rank_indices(0)[0].tolist()}
        seen = []
        batches = full.data.batches

        def recording(epoch, start_step=0):   # the images this rank trains on at step 0
            for imgs, labels in batches(epoch, start_step):
                if not seen:
                    seen.append(len(imgs))
                yield imgs, labels

        full.data.batches = recording
        info["result"] = full.train()["history"]
        info["images_per_step"] = seen[0]
        torch.save(full.module.state_dict(), base / f"full_rank{rank}.pt")

        stopped = FineTuner(cfg, encoder_from_file(encoder_file)[0], s, base / "stopped", show_progress=False)
        save = stopped.save

        def save_then_stop():   # as if the processes died right after the first epoch's checkpoint
            save()
            raise _Stop

        stopped.save = save_then_stop
        try:
            stopped.train()
        except _Stop:
            pass
        if stopped.log_file is not None:
            stopped.log_file.close()
        resumed = FineTuner(cfg, encoder_from_file(encoder_file)[0], s, base / "stopped", resume="auto",
                            show_progress=False)
        info["resumed_from_step"] = resumed.next_step
        info["resumed"] = resumed.train()["history"]
        torch.save(resumed.module.state_dict(), base / f"resumed_rank{rank}.pt")
        (base / f"info_rank{rank}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ft2")
    torch.manual_seed(0)
    save_encoder(VisionTransformer(8, 2, 1, 32, 2, 2), base / "tiny.safetensors")
    spawn_ranks(_worker, str(base), str(base / "tiny.safetensors"))
    return base


def _states(base: Path, name: str) -> list[dict]:
    return [torch.load(base / f"{name}_rank{r}.pt") for r in range(2)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_end_with_identical_weights(spawned):
    for name in ("full", "resumed"):
        a, b = _states(spawned, name)
        assert _equal(a, b), name


def test_global_batch_is_split_across_ranks(spawned):
    info = [json.loads((spawned / f"info_rank{r}.json").read_text()) for r in range(2)]
    for i in info:
        assert i["per_rank_batch"] == i["images_per_step"] == SETTINGS["batch_size"] // 2
        assert i["steps_per_epoch"] == 1438 // SETTINGS["batch_size"]
    first = [set(i["first_step_indices"]) for i in info]
    assert len(first[0]) == len(first[1]) == 64 and not first[0] & first[1]


def test_stopped_and_resumed_equals_uninterrupted(spawned):
    info = [json.loads((spawned / f"info_rank{r}.json").read_text()) for r in range(2)]
    for i in info:
        assert i["resumed_from_step"] == i["steps_per_epoch"]   # resumed after epoch 1
        assert i["resumed"] == i["result"] and len(i["result"]) == 2
    for rank, (full, resumed) in enumerate(zip(_states(spawned, "full"), _states(spawned, "resumed"))):
        assert _equal(full, resumed), rank
