"""DenseCL: the objective's loss against a float64 reference written out here (matching by an explicit cosine
matrix, cross-entropy by logsumexp), on a ViT and a ResNet; the feature queue (wrap-around, checkpointing, every
rank's keys on 2 gloo ranks); gradients; the lambda warm-up; config errors."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.data.views import two_views
from sslpt.engine.models.queue import FeatureQueue
from sslpt.engine.objectives import build_objective
from sslpt.engine.objectives.base import StepContext
from sslpt.kernels import use_backend
from testkit import spawn_ranks

VIT = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "objective.densecl.proj_hidden=24",
       "objective.densecl.proj_dim=16", "objective.densecl.queue_size=10", "train.batch_size=4"]
RESNET = ["model.arch=resnet18", "model.img_size=16", "model.resnet_stem=small", "objective.densecl.proj_hidden=24",
          "objective.densecl.proj_dim=16", "objective.densecl.queue_size=10", "train.batch_size=4"]
BATCH = 4


def _objective(overrides):
    torch.manual_seed(0)
    cfg = load_config("densecl_digits", overrides)
    return cfg, build_objective(cfg)


def _ctx(step=0, seed=5):
    return StepContext(epoch=0, step=step, steps_per_epoch=10, epochs=2, generator=torch.Generator().manual_seed(seed))


# ---- the loss against a float64 reference ------------------------------------------------------------------

def _branch64(net, imgs, is_resnet):
    """(backbone locations [B, S, C], global projection, dense projection [B, S, d]) of a float64 copy."""
    if is_resnet:
        fmap = net.encoder.feature_maps(imgs, ("layer4",))["layer4"]
        locations, pooled = fmap.flatten(2).transpose(1, 2), fmap.mean(dim=(2, 3))
    else:
        tokens = net.encoder(imgs)
        locations, pooled = tokens[:, 1:], tokens[:, 1:].mean(dim=1)   # the digits preset pools the mean token
    dense = net.dense_head(locations.reshape(-1, locations.shape[-1])).reshape(*locations.shape[:2], -1)
    return locations, net.global_head(pooled), dense


def _moco_v2_ce(q, k, queue, tau):
    """-log softmax of the positive among [q.k ; q.queue], rows normalised, mean over rows."""
    q, k, queue = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(queue, dim=-1)
    pos = (q * k).sum(-1)
    logits = torch.cat([pos[:, None], q @ queue.T], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - pos / tau).mean()


def _reference(objective, imgs, queues, is_resnet, tau=0.2, lam=0.5):
    student = copy.deepcopy(objective.model).double()
    teacher = copy.deepcopy(objective.teacher.model).double().train()
    view_q, view_k = two_views(imgs, _ctx().generator, *objective.views)
    q_loc, q_global, q_dense = _branch64(student, view_q.double(), is_resnet)
    with torch.no_grad():
        k_loc, k_global, k_dense = _branch64(teacher, view_k.double(), is_resnet)
    cosine = F.normalize(q_loc, dim=-1) @ F.normalize(k_loc, dim=-1).transpose(1, 2)
    match = cosine.argmax(dim=-1)                       # many-to-one, over the key's locations
    k_matched = torch.stack([k_dense[b, match[b]] for b in range(k_dense.shape[0])])
    global_loss = _moco_v2_ce(q_global, k_global, queues[0].double(), tau)
    dense_loss = _moco_v2_ce(q_dense.flatten(0, 1), k_matched.flatten(0, 1), queues[1].double(), tau)
    pooled_keys = F.normalize(k_dense.mean(dim=1), dim=-1)   # ONE dense key per image enters the queue
    return (1 - lam) * global_loss + lam * dense_loss, global_loss, dense_loss, F.normalize(k_global, dim=-1), \
        pooled_keys


@pytest.mark.parametrize("backbone,backend,neck_bn", [("vit", "reference", False), ("vit", "triton", False),
                                                     ("resnet", "reference", False), ("vit", "reference", True),
                                                     ("resnet", "triton", True)])
def test_loss_matches_float64_reference(backbone, backend, neck_bn):
    is_resnet = backbone == "resnet"
    cfg, objective = _objective((RESNET if is_resnet else VIT) + [f"objective.densecl.neck_bn={str(neck_bn).lower()}"])
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in objective.model.dense_head.modules()) == neck_bn
    objective.train()
    with torch.no_grad():   # a key encoder that differs from the query encoder, as after some steps
        for p in objective.teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(BATCH, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    queues = (objective.global_queue.features.clone(), objective.dense_queue.features.clone())
    want, want_global, want_dense, global_keys, dense_keys = _reference(objective, imgs, queues, is_resnet)
    with use_backend(backend):   # info_nce against the queues and dense_match, both on this backend
        loss, metrics = objective(imgs, _ctx())
    torch.testing.assert_close(loss.double(), want.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(metrics["loss_global"].double(), want_global.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(metrics["loss_dense"].double(), want_dense.detach(), atol=2e-5, rtol=0)
    # the keys wait for the optimizer step (the backward reads the queues), then fill the first BATCH slots
    assert torch.equal(objective.global_queue.features, queues[0]) and int(objective.global_queue.pointer) == 0
    objective.after_optimizer_step(_ctx())
    torch.testing.assert_close(objective.global_queue.features[:BATCH].double(), global_keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(objective.dense_queue.features[:BATCH].double(), dense_keys, atol=1e-5, rtol=0)
    assert torch.equal(objective.global_queue.features[BATCH:], queues[0][BATCH:])
    assert int(objective.global_queue.pointer) == int(objective.dense_queue.pointer) == BATCH


def test_gradients_reach_the_query_branch_only():
    cfg, objective = _objective(VIT)
    imgs = torch.randn(BATCH, 1, 8, 8)
    loss, _ = objective(imgs, _ctx())
    loss.backward()
    assert objective.model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert objective.model.dense_head[0].weight.grad.abs().sum() > 0
    assert objective.model.global_head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())
    assert not objective.global_queue.features.requires_grad


def test_keys_enter_the_queues_after_the_backward_in_micro_batch_order():
    # two accumulated micro-batches contrast against the same queue; the backward reads it without a copy
    # (autograd would refuse a saved tensor modified in place); the optimizer step enqueues both, in order
    cfg, objective = _objective(VIT)
    objective.train()
    start = objective.global_queue.features.clone()
    for seed in (1, 2):
        loss, _ = objective(torch.randn(BATCH, 1, 8, 8), _ctx(seed=seed))
        loss.backward()
        assert torch.equal(objective.global_queue.features, start)
    first, second = (keys for keys, _ in objective.pending_keys)
    objective.after_optimizer_step(_ctx())
    assert objective.pending_keys == [] and int(objective.global_queue.pointer) == 2 * BATCH % cfg.objective.queue_size
    torch.testing.assert_close(objective.global_queue.features[:BATCH], first)
    objective.eval()   # an evaluation forward enqueues nothing
    objective(torch.randn(BATCH, 1, 8, 8), _ctx())
    assert objective.pending_keys == []


def test_momentum_update_and_lambda_warmup():
    cfg, objective = _objective(VIT + ["objective.densecl.lambda_warmup_steps=3", "objective.densecl.key_momentum=0.5"])
    assert [objective.loss_lambda(s) for s in (0, 2, 3, 10)] == [0.0, 0.0, 0.5, 0.5]
    _, metrics = objective(torch.randn(BATCH, 1, 8, 8), _ctx(step=1))
    assert metrics["lambda"] == 0.0
    student, teacher = objective.model.global_head[0].weight, objective.teacher.model.global_head[0].weight
    before = teacher.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    objective.after_optimizer_step(_ctx())
    torch.testing.assert_close(teacher, 0.5 * before + 0.5 * student.detach())


def test_config_errors():
    with pytest.raises(ConfigError, match=r"objective\.densecl\.queue_size \(10\) must be at least train\.batch_size"):
        load_config("densecl_digits", ["objective.densecl.queue_size=10"])
    with pytest.raises(ConfigError, match=r"objective\.densecl\.loss_lambda must be in \[0, 1\]"):
        load_config("densecl_digits", ["objective.densecl.loss_lambda=1.5"])
    with pytest.raises(ConfigError, match=r"densecl makes its own two views"):
        load_config("densecl_digits", ["data.hflip=0.5"])


# ---- the queue -----------------------------------------------------------------------------------------------

def test_queue_wraps_around_and_is_checkpointed():
    queue = FeatureQueue(dim=3, size=5)
    assert torch.allclose(queue.features.norm(dim=1), torch.ones(5))
    first, second = torch.full((3, 3), 1.0), torch.full((3, 3), 2.0)
    queue.enqueue(first)
    assert int(queue.pointer) == 3 and torch.equal(queue.features[:3], first)
    queue.enqueue(second)   # slots 3, 4, then 0
    assert int(queue.pointer) == 1
    assert torch.equal(queue.features[[3, 4, 0]], second) and torch.equal(queue.features[1:3], first[:2])
    restored = FeatureQueue(dim=3, size=5)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features, queue.features) and int(restored.pointer) == 1
    with pytest.raises(ValueError, match="does not fit a queue of 5"):
        queue.enqueue(torch.ones(6, 3))
    with pytest.raises(ValueError, match=r"keys must have shape \[n, 3\]"):
        queue.enqueue(torch.ones(2, 4))
    with pytest.raises(ValueError, match="size >= 1"):
        FeatureQueue(dim=3, size=0)


WORLD = 2


def _queue_worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)   # the same initial queue on every rank
        queue = FeatureQueue(dim=2, size=6)
        for step in range(2):   # 2 ranks x 2 keys per step: the second step wraps around
            queue.enqueue(torch.full((2, 2), 10.0 * step + rank))
        states = [None] * WORLD
        dist.all_gather_object(states, {k: v.clone() for k, v in queue.state_dict().items()})
        if rank == 0:
            torch.save(states, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_rank_enqueues_the_keys_of_all_ranks(tmp_path):
    out = str(tmp_path / "queues.pt")
    spawn_ranks(_queue_worker, out, nprocs=WORLD)
    states = torch.load(out)
    assert torch.equal(states[0]["features"], states[1]["features"])
    features = states[0]["features"]
    # step 0: rank 0's keys (0) then rank 1's (1) in slots 0-3; step 1: 10, 10 in 4, 5 and 11, 11 in 0, 1
    assert features[:, 0].tolist() == [11.0, 11.0, 1.0, 1.0, 10.0, 10.0]
    assert int(states[0]["pointer"]) == 2
