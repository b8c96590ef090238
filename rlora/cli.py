"""`rlora` command line: thin wrappers over the library's entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_fetch_model(args: argparse.Namespace) -> None:
    from rlora.models import fetch_default_model

    print(fetch_default_model(force=args.force))


def cmd_rl(args: argparse.Namespace) -> None:
    from rlora.config import RLConfig, load_config, parse_overrides
    from rlora.rl import resume_rl, run_rl

    if args.resume:
        if args.config:
            raise SystemExit("rlora rl: give --config or --resume, not both")
        run = resume_rl(args.resume, parse_overrides(args.overrides))
    else:
        cfg = load_config(RLConfig, args.config, args.overrides)
        run = run_rl(cfg, name=Path(args.config).stem if args.config else "rl")
    print(run.path)


def cmd_demo(args: argparse.Namespace) -> None:
    from rlora.demo import main as demo_main

    demo_main(out=args.out, steps=args.steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlora", description="RL of language models with LoRA versus full fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="download and convert the offline default model (SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("rl", help="train with RL: rlora rl --config configs/X.yaml key=value ... | --resume RUN_DIR")
    p.add_argument("--config", help="flat YAML preset (configs/*.yaml)")
    p.add_argument("--resume", help="continue a run directory from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("demo", help="rank-1 LoRA vs FullFT on the CPU default, side by side")
    p.add_argument("--out", default="runs/demo", help="where the two runs, the table and the plots go")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0 = the presets' max_steps)")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # bad config keys, missing files, malformed data: one clear line, no traceback
        print(f"rlora {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
