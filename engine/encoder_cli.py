"""The ``export``, ``linprobe`` and ``finetune`` commands (parsed in engine/cli.py)."""
from __future__ import annotations

import json

from sslpt.engine.finetune import run_finetune
from sslpt.engine.linprobe import run_linprobe
from sslpt.engine.pretrained import export_run


def run_encoder_command(args) -> int:
    if args.command == "export":
        out, meta = export_run(args.run_dir, args.out, args.format, args.pool)
        print(f"wrote {out} and {out}.json ({meta['format']} names"
              f"{', timm model ' + meta['timm_model'] if meta['timm_model'] else ''})")
        return 0
    result = (run_linprobe if args.command == "linprobe" else run_finetune)(args)
    if result.pop("is_main", True):   # under torchrun, rank 0 reports
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    return 0
