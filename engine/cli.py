"""Command line: ``python -m sslpt pretrain CONFIG``, ``resume RUN_DIR``, ``probe RUN_DIR``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  python -m sslpt pretrain hpm_digits                       # the default demo (what `make pretrain` runs)
  python -m sslpt pretrain configs/mae_digits.toml --set train.epochs=5 --set optim.blr=1e-3
  python -m sslpt pretrain hpm_vit_base_800ep --set data.name=folder --set data.path=/data/imagenet
  python -m sslpt resume runs/hpm-digits-20261123-101500    # continue from the newest complete checkpoint
  torchrun --nproc-per-node 8 -m sslpt pretrain hpm_vit_base_800ep --set train.parallel=fsdp \
      --run-dir runs/hpm-b --resume auto                     # 8 GPUs; a restarted job continues where it stopped
  python -m sslpt probe runs/hpm-digits-20261123-101500     # linear probe + kNN vs a random encoder
  python -m sslpt export RUN_DIR                              # the encoder for timm (safetensors + JSON)
  python -m sslpt linprobe RUN_DIR [--random-init]           # MAE's linear probe (BatchNorm + linear, LARS)
  python -m sslpt finetune RUN_DIR [--random-init]           # MAE's fine-tuning recipe; docs/after_pretraining.md
  python -m sslpt plot runs/hpm-digits-1 runs/mae-digits-1 --out hpm_vs_mae.png   # curves, overlaid
  python -m sslpt shard /data/imagenet /data/in1k-shards      # tar shards; then --set data.name=webdataset

CONFIG is a TOML file or the name of a preset in configs/. Every field can be overridden
with --set section.key=value (sections: model, objective.<name> e.g. objective.hpm.alpha_T,
data, optim, train); values are TOML literals: 1e-3, true, [0.5, 1.0], "text".
Objectives: see `python -m sslpt presets`; adding one: docs/adding_an_objective.md.
"""


def _parser() -> argparse.ArgumentParser:
    from sslpt import __version__

    parser = argparse.ArgumentParser(prog="python -m sslpt", description="Self-supervised visual pre-training "
                                     "(HPM, MAE, SimCLR, MoCo v3) on the CPU or GPUs.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sslpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pretrain", help="pre-train from a config", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TOML file or preset name in configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run folder (default: train.out_dir/<objective>-<data>-<time>)")
    p.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                   help="auto: continue from the newest complete checkpoint in the run folder if there is one "
                        "(what torchrun restarts need), else start fresh; or a checkpoint folder to start from")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    r = sub.add_parser("resume", help="continue a run from its last complete checkpoint")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the newest complete one)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's saved config (e.g. train.epochs)")
    r.add_argument("--quiet", action="store_true")
    q = sub.add_parser("probe", help="linear probe and kNN of a run's encoder vs a random encoder")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's saved config (e.g. train.probe_shots=10)")
    sub.add_parser("presets", help="list the presets in configs/ and the objective each trains")
    c = sub.add_parser("plot", help="training curves of one or more runs, overlaid, as a PNG")
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN")
    c.add_argument("--out", type=Path, help="PNG to write (default: RUN/curves.png for one run, curves.png for "
                                            "several)")
    s = sub.add_parser("shard", help="write an image folder (or digits) as tar shards for data.name=webdataset")
    s.add_argument("folder", help="image folder (class subfolders; train/ and val/ are written as OUT/train, "
                                  "OUT/val), or 'digits'")
    s.add_argument("out", type=Path, help="output folder (shard-NNNNNN.tar + index.json)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    _add_encoder_commands(sub)
    return parser


def _add_encoder_commands(sub) -> None:
    """export, linprobe and finetune: what to do with an encoder after pre-training (docs/after_pretraining.md)."""
    e = sub.add_parser("export", help="write a run's encoder as safetensors with timm's names (+ a JSON)")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--format", choices=("timm", "torch"), default="timm",
                   help="timm: timm's VisionTransformer names (default); torch: the engine's own names")
    e.add_argument("--out", type=Path, help="the .safetensors file (default RUN/export/encoder_<format>.safetensors)")
    e.add_argument("--pool", choices=("cls", "mean"), default="cls",
                   help="the pooling the JSON's timm kwargs select (global_pool token or avg)")
    for name, what in (("linprobe", "MAE's linear probe (BatchNorm + linear head on frozen features, LARS)"),
                       ("finetune", "MAE's end-to-end fine-tuning recipe (top-1/top-5 on the val split)")):
        c = sub.add_parser(name, help=what)
        c.add_argument("source", type=Path, help="a run folder or an exported .safetensors file")
        paper = "vit_base_90ep" if name == "linprobe" else "vit_base_100ep"
        c.add_argument("--preset", help=f"digits or {paper} (default: digits for digits data, else {paper})")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"{name}.<key>=... for the protocol, any other section for the run's config (data.path)")
        c.add_argument("--run-dir", type=Path, help=f"output folder (default: a new {name}-<init>-<time> folder in "
                                                     f"the run folder, or in runs/ for a file)")
        c.add_argument("--random-init", action="store_true", help="the same architecture from random weights "
                                                                   "(the baseline)")
        c.add_argument("--quiet", action="store_true")
        if name == "finetune":
            c.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                           help="auto: continue from the newest complete checkpoint in --run-dir if any")


PROBE_ROWS = (("linear probe, cls token", "linear_cls"), ("linear probe, mean of patch tokens", "linear_mean"),
              ("kNN (k=20), cls token", "knn_cls"), ("kNN (k=20), mean of patch tokens", "knn_mean"))


def format_probe(p: dict) -> str:
    rows = list(PROBE_ROWS)
    if p.get("shots"):   # probes written before the few-label rows existed have no "shots"
        rows[2:2] = [(f"linear probe, {p['shots']} labels/class, cls", "few_shot_cls"),
                     (f"linear probe, {p['shots']} labels/class, mean", "few_shot_mean")]
    width = max(len(title) for title, _ in rows) + 2
    lines = [f"{'held-out accuracy (' + str(p['val_images']) + ' images)':<{width}}{'pre-trained':>12}{'random init':>13}"]
    for title, key in rows:
        lines.append(f"{title:<{width}}{100 * p[key + '_pretrained']:>11.1f}%{100 * p[key + '_random']:>12.1f}%")
    return "\n".join(lines)


def _print_result(result) -> None:
    print()
    if result.probe:
        print(format_probe(result.probe))
    print(f"final training loss {result.final_loss:.4f}")
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable or oversized images, each replaced by one of its class "
              f"(per epoch: the \"data\" records of metrics.jsonl)")
    print(f"run folder: {result.run_dir}  (config.toml, metrics.jsonl, curves.png, checkpoints/, pictures/, "
          f"probe.json)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sslpt.engine.checkpoint import CheckpointError
    from sslpt.engine.config import CONFIG_DIR, ConfigError, load_config
    from sslpt.engine.distributed import DistributedSetupError
    from sslpt.engine.run_dir import RunDirError

    try:
        if args.command == "presets":
            paths = sorted(CONFIG_DIR.glob("*.toml"))
            width = max(len(p.stem) for p in paths) + 2
            for path in paths:
                print(f"{path.stem:<{width}}{load_config(path).objective.name}")
            return 0
        if args.command == "probe":
            return _probe(args.run_dir, args.overrides)
        if args.command == "shard":
            from sslpt.engine.data.shards import shard_folder

            try:
                written = shard_folder(args.folder, args.out, args.shard_size, args.seed)
            except ValueError as err:   # no images, a bad --shard-size: one line
                print(f"error: {err}", file=sys.stderr)
                return 2
            for folder, index in written:
                print(f"{folder}: {sum(s['samples'] for s in index['shards'])} samples in {len(index['shards'])} "
                      f"shards, {len(index['classes'])} classes")
            return 0
        if args.command == "plot":
            from sslpt.engine.curves import plot_runs

            out = args.out or (args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
            print(plot_runs(args.run_dirs, out))
            return 0
        if args.command in ("export", "linprobe", "finetune"):
            from sslpt.engine.encoder_cli import run_encoder_command

            return run_encoder_command(args)
        from sslpt.engine.train import pretrain

        if args.command == "resume":
            config_file = args.run_dir / "config.toml"
            if not config_file.is_file():
                raise ConfigError(f"{args.run_dir} is not a run folder (no config.toml)")
            cfg = load_config(config_file, args.overrides)
            result = pretrain(cfg, run_dir=args.run_dir, resume=args.checkpoint or True, show_progress=not args.quiet)
        else:
            cfg = load_config(args.config, args.overrides)
            if args.resume == "auto" and args.run_dir is None and not cfg.train.run_name:
                raise ConfigError("--resume auto needs a fixed run folder: give --run-dir or train.run_name")
            result = pretrain(cfg, run_dir=args.run_dir, resume=args.resume or False, show_progress=not args.quiet)
    except (ConfigError, FileNotFoundError, CheckpointError, DistributedSetupError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:   # the run stopped on non-finite steps; the message says how to go on
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.is_main:
        _print_result(result)
    return 0


def _probe(run_dir: Path, overrides: list[str]) -> int:
    import torch

    from sslpt.engine.distributed import resolve_device
    from sslpt.engine.pretrained import load_run
    from sslpt.engine.probe import run_probe

    cfg, objective, _ = load_run(run_dir, overrides)
    device = resolve_device(cfg.train.device)
    with torch.no_grad():
        result = run_probe(cfg, objective.to(device), device)
    (run_dir / "probe.json").write_text(json.dumps(result, indent=2))
    print(format_probe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
