"""MOKD: the 8 loss terms of a step against a float64 literal (official loops over crop pairs, the feature search
looped over local crops and images), the gradients, the separation of the two models' losses, the two optimizers
and their schedules, both EMA teachers, the frozen prototypes, config errors and a short run."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslpt.engine.config import ConfigError, load_config
from sslpt.engine.models.mokd_heads import THead, conv_grid
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.optim import lr_at
from sslpt.engine.pretrained import export_run
from sslpt.engine.train import pretrain
from test_dino import dino_loss_loop  # DINO's DINOLoss written as the official loop

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "objective.mokd.out_dim=37",
        "objective.mokd.head_hidden=48", "objective.mokd.bottleneck_dim=24", "objective.mokd.thead_depth=1",
        "objective.mokd.local_crops=2", "objective.mokd.drop_path=0.0", "train.batch_size=8", "train.log_every=1",
        "data.synthetic_size=16", "train.probe=false", "train.eval_every=0", "data.name=synthetic",
        "objective.mokd.cnn_warmup_teacher_temp_epochs=3", "objective.mokd.vit_warmup_teacher_temp_epochs=2",
        "objective.mokd.lambda_vit=0.3", "objective.mokd.lambda_cnn=0.7", "objective.mokd.warmup_teacher_temp=0.04",
        "objective.mokd.teacher_temp=0.07", "objective.mokd.head_bn=false", 'objective.mokd.vit_pooling="cls"']


def tiny_cfg(*extra):
    return load_config("mokd_digits", TINY + list(extra))


def ctx(epoch=1, step=4, seed=0, steps_per_epoch=4, epochs=20):
    return StepContext(epoch=epoch, step=step, steps_per_epoch=steps_per_epoch, epochs=epochs,
                       generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the literal loss


def search_loop(student_logits, teacher_logits, tau_s, tau_t):
    """The official CTSearchLoss: row r against row r, no centre."""
    total = 0.0
    for s, t in zip(student_logits, teacher_logits):
        total = total - (F.softmax(t / tau_t, dim=-1) * F.log_softmax(s / tau_s, dim=-1)).sum()
    return total / len(student_logits)


def t_head_tokens(thead, feature_map=None, tokens=None):
    """Tokens with positions, and the query of a CNN map, written out."""
    if feature_map is not None:
        x = thead.reduce(feature_map)
        query = x.mean(dim=(2, 3))
        rows, cols = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
    else:
        query, rows = None, math.isqrt(tokens.shape[1])
        cols = rows
    pos = thead.pos_embed
    if rows != thead.grid or cols != thead.grid:
        grid = pos.reshape(1, thead.grid, thead.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return tokens + pos, query


def t_head_sequence(thead, sequence, drop_first=False):
    """One sequence [L, D] through the blocks and the norm, mean over its tokens (the query dropped)."""
    x = sequence[None]
    for block in thead.blocks:
        x = block(x)
    x = thead.norm(x)[0]
    return (x[1:] if drop_first else x).mean(dim=0)


def prototypes(layer):
    """W_k = g_k v_k / |v_k| in the parameters' dtype (the module's own helper works in fp32)."""
    return layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)


def head_logits(head, feature):
    return F.normalize(head.mlp(feature), dim=-1) @ prototypes(head.last_layer).T


def literal_model(net, views, is_cnn):
    """Per resolution: (global feature, T-head tokens with positions, query)."""
    if is_cnn:
        feature_map = net.encoder.feature_maps(views, ("layer4",))["layer4"]
        tokens, query = t_head_tokens(net.thead, feature_map=feature_map)
        return feature_map.mean(dim=(2, 3)), tokens, query
    out = net.encoder(views)
    tokens, _ = t_head_tokens(net.thead, tokens=out[:, 1:])
    return out[:, 0], tokens, out[:, 0]


def literal_terms(obj, imgs, step_ctx, centers, temps):
    """The 8 terms in float64 with materialised logits; obj is a float64 copy taken before the step."""
    s = obj.settings
    glob, local = (v.double() for v in obj.views(imgs, step_ctx.generator))
    batch, crops = imgs.shape[0], 2 + s.local_crops
    students, teachers = {}, {}
    for name in ("cnn", "vit"):
        net, teacher = obj.students[name], obj.teacher(name)
        teacher.train(True)
        per_res = [literal_model(net, v, name == "cnn") for v in (glob, local)]
        logits = torch.cat([head_logits(net.head, f) for f, _, _ in per_res])
        t_rows = [t_head_sequence(net.thead, tok) for _, tokens, _ in per_res for tok in tokens]
        students[name] = {"head": logits, "t": torch.stack(t_rows) @ prototypes(net.thead.last_layer).T,
                          "query": per_res[1][2]}
        feature, tokens, _ = literal_model(teacher, glob, name == "cnn")
        teachers[name] = {"head": head_logits(teacher.head, feature), "tokens": tokens, "net": teacher,
                          "t": torch.stack([t_head_sequence(teacher.thead, tok) for tok in tokens])
                          @ prototypes(teacher.thead.last_layer).T}
    other = {"cnn": "vit", "vit": "cnn"}
    for name in ("cnn", "vit"):   # this teacher's search for the other model's local queries
        t, query = teachers[name], students[other[name]]["query"].detach()
        rows = []
        for c in range(s.local_crops):
            for b in range(batch):
                sequence = torch.cat([query[c * batch + b][None], t["tokens"][b]])
                rows.append(t_head_sequence(t["net"].thead, sequence, drop_first=True))
        t["search"] = torch.stack(rows) @ prototypes(t["net"].thead.last_layer).T
    out = {}
    for name, lam in (("cnn", s.lambda_cnn), ("vit", s.lambda_vit)):
        mine, theirs = students[name], teachers[other[name]]
        out[f"{name}_head"] = dino_loss_loop(mine["head"], teachers[name]["head"], centers[f"{name}_head"], 0.1,
                                        temps[name], crops)
        out[f"{name}_thead"] = dino_loss_loop(mine["t"], teachers[name]["t"], centers[f"{name}_thead"], 0.1,
                                         s.thead_teacher_temp or temps[name], crops)
        out[f"{name}_cross"] = dino_loss_loop(mine["head"], theirs["head"], centers[f"{name}_cross"], 0.1, temps["vit"],
                                         crops)
        out[f"{name}_search"] = search_loop(mine["t"][2 * batch:], theirs["search"], 0.1,
                                            s.thead_teacher_temp or temps["vit"])
        out[f"loss_{name}"] = out[f"{name}_head"] + out[f"{name}_thead"] + lam * (out[f"{name}_cross"]
                                                                                  + out[f"{name}_search"])
    return out, teachers


def test_step_terms_and_gradients_equal_the_float64_literal():
    torch.manual_seed(0)
    obj = build_objective(tiny_cfg())
    for name in ("cnn_head", "cnn_thead", "cnn_cross", "vit_head", "vit_thead", "vit_cross"):
        getattr(obj, f"center_{name}").normal_()   # non-zero centres, as after some steps
    for net in obj.students.values():   # trained prototype norms (the ViT head's and both T-heads' are unbounded)
        with torch.no_grad():
            net.thead.last_layer.weight_g.uniform_(0.5, 3.0)
    obj.teacher_cnn.update(0.0), obj.teacher_vit.update(0.0)
    reference = copy.deepcopy(obj).double()
    centers = {k[len("center_"):]: v.clone().double() for k, v in obj.named_buffers() if k.startswith("center_")}
    imgs = torch.randn(3, 1, 8, 8)
    obj.on_epoch_start(ctx())
    assert obj.temperatures == pytest.approx({"cnn": 0.055, "vit": 0.07})
    loss, metrics = obj(imgs, ctx())
    loss.backward()
    expected, teachers = literal_terms(reference, imgs, ctx(), centers, obj.temperatures)
    for key, value in expected.items():
        name = key if key.startswith("loss_") else f"loss_{key}"
        torch.testing.assert_close(metrics[name].double(), value.detach(), rtol=1e-4, atol=1e-5, msg=key)
    total = expected["loss_cnn"] + expected["loss_vit"]
    torch.testing.assert_close(loss.double(), total.detach(), rtol=1e-4, atol=1e-5)
    total.backward()
    checked = ["cnn.head.last_layer.weight_v", "cnn.thead.last_layer.weight_g", "cnn.thead.reduce.weight",
               "cnn.thead.pos_embed", "cnn.encoder.conv1.weight", "vit.head.last_layer.weight_g",
               "vit.head.mlp.0.weight", "vit.thead.blocks.0.attn.qkv.weight", "vit.encoder.patch_embed.weight"]
    ours, theirs = dict(obj.students.named_parameters()), dict(reference.students.named_parameters())
    for name in checked:
        ours_grad, reference_grad = ours[name].grad.double(), theirs[name].grad
        error = (ours_grad - reference_grad).norm() / reference_grad.norm()   # fp32 against float64, whole tensor
        assert reference_grad.norm() > 0 and error < 1e-4, (name, float(error))
    # each centre then moved towards the batch mean of its teacher's logits
    sources = {"cnn_head": ("cnn", "head"), "cnn_thead": ("cnn", "t"), "cnn_cross": ("vit", "head"),
               "vit_head": ("vit", "head"), "vit_thead": ("vit", "t"), "vit_cross": ("cnn", "head")}
    for name, (model, head) in sources.items():
        new = 0.9 * centers[name] + 0.1 * teachers[model][head].detach().mean(0)
        torch.testing.assert_close(getattr(obj, f"center_{name}").double(), new, rtol=1e-4, atol=1e-5, msg=name)


def test_each_models_loss_reaches_only_its_own_parameters():
    obj = build_objective(tiny_cfg())
    out = obj.terms(torch.randn(2, 1, 8, 8), ctx())
    groups = {name: [p for p in obj.students[name].parameters() if p.requires_grad] for name in ("cnn", "vit")}
    for loss_model, other in (("cnn", "vit"), ("vit", "cnn")):
        loss = out[f"loss_{loss_model}"]
        foreign = torch.autograd.grad(loss, groups[other], allow_unused=True, retain_graph=True)
        assert all(g is None for g in foreign), loss_model
        own = torch.autograd.grad(loss, groups[loss_model], allow_unused=True, retain_graph=True)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in own) > 0.9 * len(own)
    assert not any(p.requires_grad for p in obj.teacher_cnn.parameters())
    assert not any(p.requires_grad for p in obj.teacher_vit.parameters())


def test_two_optimizers_with_their_own_schedules():
    cfg = tiny_cfg("optim.blr=2e-3", "optim.min_lr=1e-5", "optim.warmup_epochs=2", "objective.mokd.cnn_blr=0.4",
                   "objective.mokd.cnn_min_lr=0.01", "objective.mokd.cnn_weight_decay=3e-4")
    obj = build_objective(cfg)
    vit, cnn = obj.optimizers(cfg.optim, 2e-3 * 64 / 256)
    assert isinstance(vit, torch.optim.AdamW) and isinstance(cnn, torch.optim.SGD)
    vit_params = {id(p) for g in vit.param_groups for p in g["params"]}
    cnn_params = {id(p) for g in cnn.param_groups for p in g["params"]}
    assert vit_params == {id(p) for p in obj.students["vit"].parameters() if p.requires_grad}
    assert cnn_params == {id(p) for p in obj.students["cnn"].parameters() if p.requires_grad}
    assert not obj.students["cnn"].head.last_layer.weight_g.requires_grad   # unit prototypes for the CNN only
    assert obj.students["vit"].head.last_layer.weight_g.requires_grad
    thead = {id(p) for p in obj.students["cnn"].thead.parameters()}
    assert {id(p) for p in cnn.param_groups[2]["params"]} == thead
    step_ctx = ctx(epoch=7, step=30, epochs=20)
    for group in cnn.param_groups + vit.param_groups:   # what the trainer sets: [optim]'s schedule
        group["lr"], group["weight_decay"] = 1.2345, 0.2 * group.get("wd_scale", 1.0)
    obj.before_optimizer_step(step_ctx)
    cnn_lr = lr_at(30 / 4, 0.4 * 64 / 256, 0.01, 2, 20)
    assert [g["lr"] for g in cnn.param_groups] == [pytest.approx(cnn_lr), pytest.approx(cnn_lr), 1.2345]
    assert [g["weight_decay"] for g in cnn.param_groups] == [3e-4, 0.0, 0.2]   # the T-head: the ViT's decay
    assert {g["lr"] for g in vit.param_groups} == {1.2345}
    with pytest.raises(ConfigError, match="objective.mokd.cnn_lr"):
        tiny_cfg("optim.lr=1e-3")


def test_each_teacher_follows_its_own_student_and_the_first_epoch_freezes_prototypes():
    obj = build_objective(tiny_cfg())
    with torch.no_grad():
        for p in obj.students.parameters():
            p.add_(0.1)
    before = {n: [p.detach().clone() for p in obj.teacher(n).parameters()] for n in ("cnn", "vit")}
    step_ctx = ctx(epoch=0, step=0, steps_per_epoch=4, epochs=20)
    obj.after_optimizer_step(step_ctx)
    m = 1 - (1 - obj.settings.momentum_teacher) * (1 + math.cos(math.pi * (1 / 4) / 20)) / 2
    for name in ("cnn", "vit"):
        for old, t, s in zip(before[name], obj.teacher(name).parameters(), obj.students[name].parameters()):
            torch.testing.assert_close(t, m * old + (1 - m) * s.detach())
    for epoch, frozen in ((0, True), (1, False)):
        obj.zero_grad(set_to_none=True)
        loss, _ = obj(torch.randn(2, 1, 8, 8), ctx(epoch=epoch, step=epoch * 4))
        loss.backward()
        obj.before_optimizer_step(ctx(epoch=epoch, step=epoch * 4))
        for net in obj.students.values():
            for layer in net.last_layers():
                assert all((p.grad is None) == frozen for p in layer.parameters() if p.requires_grad)
            assert net.head.mlp[0].weight.grad is not None


def test_t_head_resamples_positions_and_excludes_the_query():
    head = THead(16, 5, grid=4, depth=1, heads=2, in_channels=8)
    tokens, query = head.embed_map(torch.randn(3, 8, 2, 2))
    assert tokens.shape == (3, 4, 16) and query.shape == (3, 16)
    assert head.pooled(tokens).shape == (3, 16) and head.pooled(tokens, query).shape == (3, 16)
    assert not torch.allclose(head.pooled(tokens), head.pooled(tokens, query))
    assert head.last_layer.weight_g.requires_grad and conv_grid(224, 5) == 7 and conv_grid(96, 5) == 3
    with pytest.raises(ValueError, match="square grid"):
        THead(16, 5, grid=4, heads=2).embed_tokens(torch.randn(1, 6, 16))


@pytest.mark.parametrize("override,field", [
    ("objective.mokd.local_crops=0", "local_crops"), ("objective.mokd.lambda_vit=-1", "lambda_vit"),
    ("objective.mokd.local_size=3", "local_size"), ("objective.mokd.cnn_momentum=1.0", "cnn_momentum"),
    ("objective.mokd.cnn_arch=vgg", "cnn_arch"), ("objective.mokd.center_momentum=2", "center_momentum"),
    ("model.arch=resnet18", "model.arch"), ("train.parallel=fsdp", "train.parallel"),
    ("objective.mokd.probe_model=both", "probe_model"), ("objective.mokd.thead_teacher_temp=0", "thead_teacher_temp"),
    ("objective.mokd.cnn_width=0", "cnn_width"),
])
def test_bad_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        tiny_cfg(override)


def test_short_run_logs_every_term_and_probes_either_model(tmp_path):
    result = pretrain(tiny_cfg(f"train.out_dir={tmp_path}", "train.epochs=1", "train.run_name=r"), show_progress=False)
    assert math.isfinite(result.final_loss)
    records = [line for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert records and all(k in records[-1] for k in ("loss_cnn_search", "loss_vit_cross", "lr_cnn"))
    _, meta = export_run(tmp_path / "r")   # the probed student backbone (the ViT by default) exports
    assert meta["architecture"] == "vit" and meta["objective"] == "mokd"
    cnn = build_objective(tiny_cfg("objective.mokd.probe_model=cnn"))
    assert type(cnn.encoder).__name__ == "ResNet" and type(build_objective(tiny_cfg()).encoder).__name__ == \
        "VisionTransformer"


def test_cnn_width_and_the_vits_pooling():
    """objective.mokd.cnn_width narrows the ResNet (its T-head's 1x1 reduction follows); export refuses a probed
    CNN of width != 64 naming the field; vit_pooling = "mean" feeds the ViT's DINO head and query the mean of
    its patch tokens; head_bn puts BatchNorms in the DINO heads."""
    from sslpt.engine.export import ExportError, require_library_width

    obj = build_objective(tiny_cfg("objective.mokd.cnn_width=8", "objective.mokd.probe_model=cnn"))
    cnn = obj.students["cnn"]
    assert cnn.encoder.width == 8 and cnn.encoder.embed_dim == 64 and cnn.thead.reduce.in_channels == 64
    assert obj.teacher("cnn").encoder.layer4[0].conv1.weight.shape == (64, 32, 3, 3)
    with pytest.raises(ExportError, match=r"objective\.mokd\.cnn_width=8"):
        require_library_width(obj.encoder, obj.width_field)
    torch.manual_seed(0)
    obj = build_objective(tiny_cfg('objective.mokd.vit_pooling="mean"', "objective.mokd.head_bn=true"))
    vit = obj.students["vit"]
    imgs = torch.randn(3, 1, 8, 8)
    feature, tokens, query = vit.encode(imgs)
    out = vit.encoder(imgs)
    torch.testing.assert_close(feature, out[:, 1:].mean(dim=1))
    assert torch.equal(query, feature) and obj.teacher("vit").pooling == "mean"
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in vit.head.modules())
    loss, _ = obj(imgs, ctx())
    assert math.isfinite(loss.item())


def test_thead_teacher_temp_sets_only_the_t_head_terms():
    """thead_teacher_temp replaces the scheduled teacher temperature in the own-T-head and search terms of both
    models; the DINO-head and cross terms keep the schedule. Equal to the schedule's value: the same loss."""
    imgs, step_ctx = torch.randn(4, 1, 8, 8), ctx(epoch=40, epochs=50)   # past both warm-ups: one temperature
    terms, scheduled = {}, tiny_cfg().objective.teacher_temp
    for temp in (None, scheduled, 0.3):
        torch.manual_seed(0)
        cfg = tiny_cfg()
        cfg.objective.thead_teacher_temp = temp   # None (the official schedules) has no TOML spelling
        obj = build_objective(cfg)
        obj.on_epoch_start(step_ctx)
        assert obj.temperatures == {"cnn": scheduled, "vit": scheduled}
        _, metrics = obj(imgs, ctx(epoch=40, epochs=50))
        terms[temp] = {k: float(v) for k, v in metrics.items() if k.startswith("loss_")}
    assert terms[None] == pytest.approx(terms[scheduled], rel=1e-6)
    for model in ("cnn", "vit"):
        for term in ("head", "cross"):
            assert terms[0.3][f"loss_{model}_{term}"] == pytest.approx(terms[None][f"loss_{model}_{term}"], rel=1e-6)
        for term in ("thead", "search"):
            assert terms[0.3][f"loss_{model}_{term}"] != pytest.approx(terms[None][f"loss_{model}_{term}"], rel=1e-3)
