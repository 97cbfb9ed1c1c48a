"""`firm policy export`: the policy subcommands (heavy imports happen inside the handler)."""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`firm policy export RUN_DIR OUT_DIR [--checkpoint CKPT] [--ema] [--adapter default|old]`."""
    p = sub.noun("policy").add_parser(
        "export",
        help="export a run's LoRA for diffusers' load_lora_weights",
        description="Write RUN_DIR's trained LoRA (last checkpoint) to OUT_DIR/pytorch_lora_weights.safetensors, "
        "loadable with pipe.load_lora_weights(OUT_DIR).",
    )
    p.add_argument("run_dir", help="a FIRM RL run directory (holds config.yaml and checkpoints/)")
    p.add_argument("out_dir", help="where to write the LoRA")
    p.add_argument("--checkpoint", help="a checkpoint file (default: RUN_DIR/checkpoints/last.ckpt)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with module.ema_decay set)")
    p.add_argument("--adapter", default="default", choices=["default", "old"], help="which adapter to export")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from firm.policies.export import export_lora

    try:
        path = export_lora(args.run_dir, args.out_dir, checkpoint=args.checkpoint, adapter=args.adapter, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"firm policy export: error: {e}", file=sys.stderr)
        return 2
    print(f"[firm] wrote {path}; load it with pipe.load_lora_weights({str(path.parent)!r})")
    return 0
