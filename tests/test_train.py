"""End-to-end runs of the training loop on tiny models (CPU, a few seconds each): learning, epoch resume,
precisions, the non-finite guard (skip / fail, NaN and overflowing losses), torch.compile, throughput fields."""
import json
import shutil

import pytest
import torch

from sslpt import kernels
from sslpt.engine.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, read_commit
from sslpt.engine.config import load_config
from sslpt.engine.models.vit import Block
from sslpt.engine.objectives import build_objective
from sslpt.engine.train import Trainer, pretrain, train_step_optimizer

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2", "train.batch_size=64", "train.log_every=5", "data.synthetic_size=256",
        "train.probe=false", "train.eval_every=0", "data.name=synthetic"]


def cfg_for(objective="hpm", *extra):
    return load_config(f"{objective}_digits", TINY + list(extra))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["type"] == "train"]


@pytest.mark.parametrize("objective", ["hpm", "mae"])
def test_short_run_learns(tmp_path, objective):
    cfg = cfg_for(objective, "train.epochs=6", "optim.warmup_epochs=1", "train.eval_every=3")
    result = pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)
    records = read_metrics(result.run_dir)
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["loss_rec"] < 0.8 * train[0]["loss_rec"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 3, 6]    # after epoch 1, then every 3 (epochs count from 1)
    assert (result.run_dir / "config.toml").is_file()
    assert len(list_checkpoints(result.run_dir)) == 2    # keep_checkpoints = 2
    assert (result.run_dir / "pictures" / "recon_epoch0006.png").is_file()
    # throughput: img/s per device and in all, model TFLOP/s; no MFU or peak memory on the CPU
    last = train[-1]
    assert last["img_per_s_per_device"] > 0 and last["img_per_s"] == last["img_per_s_per_device"]
    assert last["tflops_per_device"] > 0 and "mfu" not in last and "peak_mem_gib" not in last
    assert last["skipped_steps"] == 0
    if objective == "hpm":
        assert (result.run_dir / "pictures" / "hpm_epoch0006.png").is_file()
        assert "spearman_teacher" in evals[-1] and "loss_pred" in train[-1]
        assert {"num_hard", "ema_decay", "mask_ratio", "skipped_steps", "skipped_images"} <= evals[-1].keys()
    # curves.png is redrawn at each evaluation, one point per evaluation on the eval charts
    from sslpt.engine.curves import series

    assert (result.run_dir / "curves.png").is_file()
    assert [x for x, _ in series(records, "eval", "val_loss_rec")] == [1.0, 3.0, 6.0]


def model_state(run_dir, cfg):
    objective = build_objective(cfg)
    load_checkpoint(latest_checkpoint(run_dir), objective)
    return objective.state_dict()


def test_resume_neither_skips_nor_repeats_an_epoch(tmp_path):
    """2 epochs, then resume to 4 == 4 epochs straight, bit for bit (HPM's official resume skips one)."""
    cfg = cfg_for("hpm", "train.epochs=4")
    straight = pretrain(cfg, run_dir=tmp_path / "a", show_progress=False)
    pretrain(cfg_for("hpm", "train.epochs=4", "train.save_every=2"), run_dir=tmp_path / "b", show_progress=False)
    # simulate a crash after epoch 2: drop the later checkpoint, then resume
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000016")
    assert read_commit(latest_checkpoint(tmp_path / "b"))["epoch"] == 2     # the next epoch to run
    resumed = pretrain(cfg, run_dir=tmp_path / "b", resume=True, show_progress=False)
    a, b = model_state(straight.run_dir, cfg), model_state(resumed.run_dir, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_a = [r["step"] for r in train_records(tmp_path / "a")]
    steps_b = [r["step"] for r in train_records(tmp_path / "b")]
    # run b logged epochs 0-3, then again epochs 2-3 after the resume
    assert steps_b == steps_a + steps_a[len(steps_a) // 2:]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        pretrain(cfg_for("hpm", "train.epochs=1"), run_dir=tmp_path / "empty", resume=True, show_progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    result = pretrain(cfg_for("hpm", "train.epochs=1", f"train.precision={precision}"), run_dir=tmp_path / precision,
                      show_progress=False)
    assert result.final_loss == result.final_loss  # finite (NaN != NaN)


# ------------------------------------------------------------------------------------- non-finite guard
def poison(monkeypatch, factor: float, steps):
    """Multiply the HPM loss by ``factor`` (NaN, or huge) at the given global steps."""
    from sslpt.engine.objectives.hpm import HPM

    forward = HPM.forward

    def poisoned(self, imgs, ctx):
        loss, metrics = forward(self, imgs, ctx)
        return (loss * factor if ctx.step in steps else loss), metrics

    monkeypatch.setattr(HPM, "forward", poisoned)


def watch_steps(monkeypatch, steps):
    """{step: (params before, params after)} of the trainable model around the given steps."""
    seen = {}
    original = Trainer.train_step

    def spy(self, imgs, ctx, update):
        before = [p.detach().clone() for p in self.objective.trainable.parameters()]
        out = original(self, imgs, ctx, update)
        if ctx.step in steps:
            seen[ctx.step] = (before, [p.detach().clone() for p in self.objective.trainable.parameters()])
        return out

    monkeypatch.setattr(Trainer, "train_step", spy)
    return seen


@pytest.mark.parametrize("precision,factor", [("fp32", float("nan")), ("fp16", 1e30)], ids=["nan", "fp16-overflow"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch, precision, factor):
    """A NaN loss, or a huge one whose scaled gradients overflow fp16: the step changes nothing, is counted,
    and training goes on."""
    poison(monkeypatch, factor, {5})
    seen = watch_steps(monkeypatch, {5, 6})
    cfg = cfg_for("hpm", "train.epochs=2", f"train.precision={precision}", "train.log_every=1")
    result = pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)
    before, after = seen[5]
    assert all(torch.equal(a, b) for a, b in zip(before, after))          # skipped: parameters untouched
    assert not all(torch.equal(a, b) for a, b in zip(*seen[6]))           # a normal step moves them
    records = {r["step"]: r for r in train_records(result.run_dir)}
    assert records[6]["skipped_steps"] == 1 and records[8]["max_consecutive_skips"] <= 1
    assert result.final_loss == result.final_loss
    assert read_commit(latest_checkpoint(result.run_dir))["skipped_steps"] >= 1


def test_consecutive_skips_stop_the_run(tmp_path, monkeypatch):
    poison(monkeypatch, float("nan"), set(range(2, 100)))
    cfg = cfg_for("hpm", "train.epochs=3", "train.max_consecutive_skips=3", "train.log_every=2")
    with pytest.raises(FloatingPointError, match=r"\d+ optimizer steps in a row .*max_consecutive_skips=3"):
        pretrain(cfg, run_dir=tmp_path / "run", show_progress=False)


def test_fail_policy_raises_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, float("nan"), {5})
    cfg = cfg_for("hpm", "train.epochs=3", "train.nonfinite=fail")
    with pytest.raises(FloatingPointError, match="non-finite loss or gradients at epoch 1"):
        pretrain(cfg, run_dir=tmp_path / "nan", show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step_00000004"]   # end of epoch 0, kept


def test_guarded_step_skips_on_the_device():
    """train_step_optimizer: no update and no optimizer-state change for a NaN gradient; fused AdamW."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.randn(2, 4)).sum().backward()
    assert float(train_step_optimizer(optimizer, scaler, None)) == 0.0
    optimizer.zero_grad()
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    weights = model.weight.detach().clone()
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()
    assert float(train_step_optimizer(optimizer, scaler, 1.0)) == 1.0
    assert torch.equal(model.weight, weights)
    assert all(torch.equal(v, optimizer.state[model.weight][k]) for k, v in state.items())


@pytest.mark.gpu
def test_guarded_step_does_not_sync_on_cuda():
    model = torch.nn.Linear(64, 64, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for enabled in (False, True):
        scaler = torch.amp.GradScaler("cuda", enabled=enabled)
        scaler.scale(model(torch.randn(8, 64, device="cuda")).sum()).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step_optimizer(optimizer, scaler, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad()


# ------------------------------------------------------------------------------------- torch.compile
# graphs per run, none per step after the first: MAE's encoder and decoder blocks (same code, other shapes); HPM
# (without its easy-to-hard ramp, so that the teacher picks the masks from the first step) also the no-grad
# teacher's encoder on whole images and its loss predictor's decoder
@pytest.mark.parametrize("objective, extra, graphs", [("mae", (), 2), ("hpm", ("objective.hpm.alpha_ramp=0",), 4)])
def test_compiled_blocks_match_eager(tmp_path, objective, extra, graphs):
    """train.compile (the default of the ViT-B MAE and HPM presets): every block compiled with fullgraph=True;
    per-step losses equal eager's (tolerance)."""
    common = ("train.epochs=1", "train.log_every=1", "train.deterministic=false", *extra)
    eager = pretrain(cfg_for(objective, *common), run_dir=tmp_path / "eager", show_progress=False)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()   # graphs of an earlier test (same block code, same shapes) would be reused
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = pretrain(cfg_for(objective, *common, "train.compile=true", "train.compile_backend=aot_eager"),
                        run_dir=tmp_path / "compiled", show_progress=False)
    assert counters["stats"]["unique_graphs"] - graphs_before == graphs
    a, b = train_records(eager.run_dir), train_records(compiled.run_dir)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "loss_rec", "loss_pred"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4), key


def test_triton_custom_ops_compile_in_one_graph():
    """A block on our Triton attention (interpreter here), traced with fullgraph=True: the custom op is in the
    graph (no break) and output and gradients equal eager's."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    block = Block(16, 2, attn_backend="triton")
    x = torch.randn(2, 5, 16, requires_grad=True)
    with kernels.use_backend("triton"):
        ref = block(x)
        ref_grad, = torch.autograd.grad(ref.sum(), x)
        out = torch.compile(block, fullgraph=True, dynamic=False, backend=capture)(x)
        grad, = torch.autograd.grad(out.sum(), x)
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(name.startswith("sslpt.") for name in ops), ops
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
