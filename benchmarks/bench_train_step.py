"""End-to-end benchmark: images/s, MFU and peak memory of one MAE, one HPM, one DropPos and one SemAIM training step.

One step is exactly the engine's ``Trainer.train_step`` (forward under bf16 autocast, backward, AdamW step,
HPM's EMA-teacher update), called on an objective built from the presets configs/mae_vit_base_1600ep.toml
and configs/hpm_vit_base_800ep.toml with ``model.arch`` set to ViT-B/16 or ViT-L/16 at 224 px. HPM runs
at its final schedule epoch (the teacher scores every patch, half of the masked set is hard), its
steady-state cost. SemAIM (configs/semaim_vit_base_800ep.toml) pays its no-grad scoring forward, the
order-masked content stream and one query block per encoder block in every step. data2vec 2.0
(configs/data2vec2_vit_base_150ep.toml) counts images, not masked copies: each image is 16 student passes
over its visible tokens plus one teacher pass, so its img/s and FLOPs per image sit beside MAE's with the
same encoder (the tiny CPU model: no pre-net blocks, 4 copies). Inputs are one fixed
batch of random images already on the device: data loading and augmentation are not timed.

Providers:
    kernels    the engine with ``kernels.use_backend("auto")``: the CUDA extension or Triton on GPU
    reference  the same engine on the pure-PyTorch reference ops (``use_backend("reference")``)
    compile    torch.compile of the reference: the objective module compiled (``nn.Module.compile``);
               the optimizer step and teacher update stay eager
    kernels_compiled  "kernels" with each transformer block compiled (fullgraph, static shapes: the engine's
               ``train.compile``, on by default in the ViT-B MAE and HPM presets): our ops stay custom ops
               inside the graphs, the framework's launches between them are fused

Batch: the largest power-of-two per-GPU batch up to 256 that fits, searched down on out-of-memory,
per provider (the row says which). Rates: FLOPs are the objective's analytic ``flops_per_image()``
(forward + backward, matmuls and attention); TFLOP/s = FLOPs x images/s; MFU = that / the device's
dense bf16 datasheet peak (engine.train.PEAK_TFLOPS; none for unknown devices and the CPU); roofline =
that / the bf16 matmul rate measured in this run. Peak memory is the whole step's (weights, optimizer
state, teacher, activations). HPM/MAE is HPM's time per image over MAE's (same model and provider).
DropPos (configs/droppos_vit_base_800ep.toml, attentive reconstruction on, per-parameter clipping) also
reports "attn guide/step": its no-grad full-image encoder pass timed alone, over the whole step that
includes it. HPM's row also breaks its step down ("HPM parts"): the teacher's no-grad scoring pass over the
whole image, the hard-patch masking that reads its scores, and the EMA update, each timed alone and shown
as a fraction of the step; the rest is the student (MAE's work plus the loss-predictor decoder and the
relative loss, forward and backward) and the optimizer.

CPU tiny mode (the default on CPU): a ViT-Tiny-width, 2-block model on 32 px images (patch 4), batch 4,
one warm-up and one timed step; "kernels" then runs Triton under the interpreter when TRITON_INTERPRET=1.
It checks the wiring, not the speed.

    python -m benchmarks.bench_train_step [--device cuda] [--archs vit_base] [--providers kernels reference]
        [--objectives mae hpm] [--max-batch 256] [--json out.json]
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from sslpt import kernels
from benchmarks.harness import ProviderUnavailable, Row, device_roofline, emit_row, keep_going, report, short_error
from sslpt.engine.config import load_config
from sslpt.engine.distributed import wrap_blocks
from sslpt.engine.objectives import StepContext, build_objective
from sslpt.engine.optim import base_lr, build_optimizer
from sslpt.engine.train import Trainer, autocast, peak_tflops, step_generator

FAMILY = "train_step"
OBJECTIVES = ("mae", "hpm", "droppos", "semaim", "data2vec2")
PRESETS = {"mae": "mae_vit_base_1600ep", "hpm": "hpm_vit_base_800ep", "droppos": "droppos_vit_base_800ep",
           "semaim": "semaim_vit_base_800ep", "data2vec2": "data2vec2_vit_base_150ep"}
ARCHS = ("vit_base", "vit_large")
PROVIDERS = ("kernels", "reference", "compile", "kernels_compiled")
COMPILED = ("compile", "kernels_compiled")   # timed last; a compile failure makes the row "unavailable"
MAX_BATCH = 256
TINY_ARCH = "vit_tiny"
TINY_BATCH = 4
TINY_OVERRIDES = ("model.img_size=32", "model.patch_size=4", "model.depth=2", "model.decoder_dim=64",
                  "model.decoder_depth=1", "model.decoder_heads=2")
# the 2-block tiny model has no room for data2vec 2.0's 2 pre-net blocks (all of its blocks give targets), and 4
# masked copies instead of 16 keep the Triton-interpreter row of the CPU smoke test short
TINY_OBJECTIVE_OVERRIDES = {"data2vec2": ("objective.data2vec2.prenet_depth=0", "objective.data2vec2.top_k_layers=0",
                                          "objective.data2vec2.clones=4")}


def backend_for(provider: str, device) -> str:
    """The kernels backend a provider runs on. On CPU "auto" is the reference, so "kernels" runs the Triton
    kernels under the interpreter there when it is on (else it is the reference too)."""
    if provider not in ("kernels", "kernels_compiled"):
        return "reference"
    from sslpt.kernels._backend import triton_usable

    if torch.device(device).type == "cpu" and triton_usable(torch.device("cpu"))[0]:
        return "triton"
    return "auto"


def make_config(objective: str, arch: str, batch: int, device, tiny: bool):
    overrides = [f"model.arch={arch}", f"train.batch_size={batch}", "train.precision=bf16",
                 "data.name=synthetic", f"train.device={torch.device(device).type}"]
    if tiny:
        overrides += list(TINY_OVERRIDES) + list(TINY_OBJECTIVE_OVERRIDES.get(objective, ()))
    return load_config(PRESETS[objective], overrides)


def case_name(cfg) -> str:
    m = cfg.model
    model = m.arch.replace("vit_", "ViT-").replace("base", "B").replace("large", "L").replace("tiny", "Ti")
    return f"{cfg.objective.name} {model}/{m.patch_size} {m.img_size}px {cfg.train.precision}"


class StepBench:
    """One objective + optimizer on ``device``, and the zero-argument step the engine's loop would run."""

    def __init__(self, cfg, device, provider: str, compile_backend: str):
        self.cfg, self.device = cfg, torch.device(device)
        self.backend = backend_for(provider, device)
        torch.manual_seed(cfg.train.seed)
        with torch.device(self.device):  # parameters made on the device: no host init and copy
            objective = build_objective(cfg)
        objective.to(self.device).train()
        self.epoch = cfg.train.epochs - 1  # HPM's final schedule: the teacher runs, num_hard is largest
        batch = cfg.train.batch_size
        optimizer = build_optimizer(objective.trainable, cfg.optim, base_lr(cfg.optim, batch))
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        if provider == "compile":
            objective.compile(backend=compile_backend, dynamic=False)
        elif provider == "kernels_compiled":
            wrap_blocks(objective, activation_checkpointing=False, compile=True, compile_backend=compile_backend)
        # Trainer.train_step reads only these attributes: call the engine's own step on them
        self.trainer = SimpleNamespace(cfg=cfg, device=self.device, objective=objective, optimizers=[optimizer],
                                       scaler=scaler)
        m = cfg.model
        self.imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=self.device)
        self.ctx = StepContext(epoch=self.epoch, step=self.epoch, steps_per_epoch=1, epochs=cfg.train.epochs,
                               generator=step_generator(cfg.train.seed, self.epoch, 0, 0, self.device))
        objective.on_epoch_start(self.ctx)
        self.flops_per_image = objective.flops_per_image()

    def __call__(self) -> torch.Tensor:
        with kernels.use_backend(self.backend):
            loss, _ = Trainer.train_step(self.trainer, self.imgs, self.ctx, True)
        return loss


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, rep: int) -> tuple[float, float | None, float]:
    """(median ms per step, peak MiB allocated during the timed steps or None on CPU, warm-up seconds)."""
    cuda = torch.device(device).type == "cuda"
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, rep)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return statistics.median(times), peak, warmup_s


def _release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(objective: str, arch: str, provider: str, device, *, tiny: bool, max_batch: int, warmup: int, rep: int,
            compile_backend: str, roof: dict) -> Row:
    """One row: the largest batch (halving from ``max_batch``) whose step fits, timed."""
    batch, oom = max_batch, []
    while True:
        cfg = make_config(objective, arch, batch, device, tiny)
        result = _try_batch(cfg, device, provider, warmup, rep, compile_backend)
        if result is not None:
            break
        oom.append(batch)
        _release(device)
        if batch == 1:
            raise torch.OutOfMemoryError(f"{case_name(cfg)} does not fit even at batch 1")
        batch //= 2
    ms, peak, warmup_s, flops_per_image, backend, guide_ms, hpm_parts = result
    images_per_s = batch / (ms / 1e3)
    achieved = flops_per_image * images_per_s / 1e12
    peak_datasheet = peak_tflops(torch.device(device))
    extra = {"objective": objective, "arch": arch, "batch": batch, "images_per_s": images_per_s,
             "ms_per_image": ms / batch, "flops_per_image": flops_per_image,
             "mfu": achieved / peak_datasheet if peak_datasheet else None, "peak_tflops_datasheet": peak_datasheet,
             "backend": backend, "attn_backend": getattr(cfg.model, "attn_backend", None),
             "warmup_s": round(warmup_s, 2), "oom_batches": oom,
             "attn_guide_ms": guide_ms, "attn_guide_over_step": guide_ms / ms if guide_ms else None,
             **{f"{part}_ms": t for part, t in hpm_parts.items()},
             **{f"{part}_over_step": t / ms for part, t in hpm_parts.items()}}
    return Row(FAMILY, case_name(cfg), provider, "step", ms, None, achieved,
               achieved / roof["matmul_tflops"] if roof else None, peak, extra=extra)


def _try_batch(cfg, device, provider, warmup, rep, compile_backend):
    """(ms, peak MiB, warm-up s, FLOPs/image, backend), or None when this batch runs out of memory."""
    try:
        bench = StepBench(cfg, device, provider, compile_backend)
        ms, peak, warmup_s = time_steps(bench, device, warmup, rep)
        return (ms, peak, warmup_s, bench.flops_per_image, bench.backend, attn_guide_ms(bench, warmup, rep),
                hpm_parts_ms(bench, warmup, rep))
    except torch.OutOfMemoryError:
        return None
    finally:
        bench = None
        if provider in COMPILED:
            torch._dynamo.reset()


def attn_guide_ms(bench: StepBench, warmup: int, rep: int) -> float | None:
    """DropPos: median ms of its attentive-reconstruction pass alone (the no-grad encoder forward on the full
    image, as the step runs it); None for other objectives or when the pass is off."""
    objective = bench.trainer.objective
    settings = getattr(objective, "settings", None)
    if not (getattr(settings, "attn_guide", False) and getattr(settings, "attn_source", "") == "full"):
        return None
    ids_keep = objective.draw(bench.imgs, torch.Generator(bench.device).manual_seed(0)).masking.ids_keep

    def guide():
        with kernels.use_backend(bench.backend), autocast(bench.device, bench.cfg.train.precision):
            return objective.guide_weights(bench.imgs, ids_keep)
    return time_steps(guide, bench.device, warmup, rep)[0]


HPM_PARTS = ("teacher", "masking", "ema")


def hpm_parts_ms(bench: StepBench, warmup: int, rep: int) -> dict[str, float]:
    """HPM: median ms of each part its step adds to MAE's, timed alone as the step runs it: the teacher's
    scoring pass (``teacher``), the hard-patch masking from those scores (``masking``) and the EMA update
    (``ema``). Empty for other objectives."""
    objective = bench.trainer.objective
    if getattr(objective, "name", "") != "hpm":
        return {}
    settings, ctx, imgs = objective.settings, bench.ctx, bench.imgs
    k = objective.num_hard(ctx)

    def teacher():
        with kernels.use_backend(bench.backend), autocast(bench.device, bench.cfg.train.precision):
            return objective.teacher_scores(imgs)
    scores = teacher()

    def masking():
        with kernels.use_backend(bench.backend):
            return kernels.hard_patch_masking(scores, objective.mask_ratio, k, generator=ctx.generator,
                                              tie_break=settings.tie_break)

    def ema():
        objective.teacher.update(objective.decay)
        return scores
    return {name: time_steps(fn, bench.device, warmup, rep)[0]
            for name, fn in zip(HPM_PARTS, (teacher, masking, ema))}


def _failed(objective: str, arch: str, provider: str, device, tiny: bool, note: str) -> Row:
    print(f"[bench] {FAMILY}/{objective} {arch}: no timing for provider {provider!r}: {note}", file=sys.stderr)
    _release(device)
    cfg = make_config(objective, arch, 1, device, tiny)
    return Row(FAMILY, case_name(cfg), provider, "step", float("nan"), None, None, None, None, note=note,
               extra={"objective": objective, "arch": arch})


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None, objectives=OBJECTIVES,
        archs=None, providers=PROVIDERS, max_batch: int | None = None, compile_backend: str | None = None) -> list[Row]:
    """Rows for every (arch, objective, provider); ``tiny`` picks the small CPU model and one repetition."""
    device = torch.device(device)
    warmup = warmup if warmup is not None else (1 if tiny else 3)
    rep = rep if rep is not None else (1 if tiny else 10)
    archs = archs or ((TINY_ARCH,) if tiny else ARCHS)
    max_batch = max_batch or (TINY_BATCH if tiny else MAX_BATCH)
    if compile_backend is None:  # inductor on CPU needs a C++ toolchain and minutes: trace only there
        compile_backend = "eager" if device.type == "cpu" else "inductor"
    roof = device_roofline(device)
    rows: list[Row] = []
    # compile last: its compilation is the slowest part, and a time limit should cut it, not the eager rows
    order = [p for p in providers if p not in COMPILED] + [p for p in providers if p in COMPILED]
    for arch in archs:
        for provider in order:
            for objective in objectives:
                try:
                    row = measure(objective, arch, provider, device, tiny=tiny, max_batch=max_batch, warmup=warmup,
                                  rep=rep, compile_backend=compile_backend, roof=roof)
                except ProviderUnavailable as why:
                    row = _failed(objective, arch, provider, device, tiny, f"unavailable: {why}")
                except torch.OutOfMemoryError as exc:
                    row = _failed(objective, arch, provider, device, tiny, f"out of memory: {short_error(exc)}")
                except Exception as exc:  # noqa: BLE001 - compile failures mean "not available here"
                    if provider in COMPILED:
                        row = _failed(objective, arch, provider, device, tiny,
                                      f"unavailable: torch.compile failed: {short_error(exc)}")
                    elif keep_going():
                        row = _failed(objective, arch, provider, device, tiny, f"failed: {short_error(exc)}")
                    else:
                        raise
                rows.append(emit_row(row))
    add_hpm_over_mae(rows)
    return rows


def add_hpm_over_mae(rows: list[Row]) -> None:
    """Set extra["hpm_over_mae"] on each HPM row: its time per image over MAE's (same arch and provider)."""
    per_image = {(r.extra["arch"], r.provider, r.extra["objective"]): r.extra["ms_per_image"]
                 for r in rows if r.extra and "ms_per_image" in r.extra}
    for r in rows:
        if r.extra and r.extra.get("objective") == "hpm" and "ms_per_image" in r.extra:
            mae = per_image.get((r.extra["arch"], r.provider, "mae"))
            r.extra["hpm_over_mae"] = r.extra["ms_per_image"] / mae if mae else None


def _f(value, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value * scale, spec)


def hpm_parts_cell(extra: dict) -> str:
    if f"{HPM_PARTS[0]}_over_step" not in extra:
        return "-"
    return " / ".join(_f(extra[f"{part}_over_step"], ".2f") for part in HPM_PARTS)


def markdown(rows) -> str:
    """The training-step table: one line per (case, provider); rows without a timing say why in a note."""
    lines = ["| case | provider | batch | step ms | img/s | TFLOP/s | MFU | of measured matmul | peak GiB | HPM/MAE "
             "| attn guide/step | HPM parts: teacher / masking / EMA of step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        x = r.extra or {}
        if not math.isfinite(r.ms):
            lines.append(f"| {r.case} | {r.provider} | - | no timing | - | - | - | - | - | - | - | - |")
            continue
        mfu = _f(x.get("mfu"), ".1f", 100) + ("%" if x.get("mfu") else "")
        of_matmul = _f(r.roofline, ".1f", 100) + ("%" if r.roofline else "")
        lines.append(f"| {r.case} | {r.provider} | {x.get('batch', '-')} | {r.ms:.1f} "
                     f"| {_f(x.get('images_per_s'), '.0f')} | {_f(r.tflops, '.1f')} | {mfu} | {of_matmul} "
                     f"| {_f(r.peak_mb, '.1f', 1 / 1024)} | {_f(x.get('hpm_over_mae'), '.2f')} "
                     f"| {_f(x.get('attn_guide_over_step'), '.2f')} | {hpm_parts_cell(x)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (the default on CPU)")
    parser.add_argument("--json", help="also write the rows and environment to this file")
    parser.add_argument("--archs", nargs="+", choices=(*ARCHS, TINY_ARCH), help="default: ViT-B and ViT-L")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--max-batch", type=int, help=f"largest per-GPU batch tried (default {MAX_BATCH})")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 3; 1 tiny)")
    parser.add_argument("--rep", type=int, help="timed steps, median reported (default 10; 1 tiny)")
    args = parser.parse_args(argv)
    tiny = args.tiny or torch.device(args.device).type == "cpu"
    report("training step", lambda: run(args.device, tiny, warmup=args.warmup, rep=args.rep,
                                        objectives=args.objectives, archs=args.archs, providers=args.providers,
                                        max_batch=args.max_batch),
           args.device, tiny, args.json, markdown=markdown)

if __name__ == "__main__":
    main()
