"""Command line: `sparseadapter demo` (more subcommands arrive with training, pruning and export)."""
import argparse
import sys
from dataclasses import fields

from .demo import DemoConfig, run_demo


def _add_config_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    for f in fields(config_cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparseadapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a projection, train it sparse on CPU, time it against dense")
    _add_config_flags(demo, DemoConfig)
    args = parser.parse_args(argv)
    if args.command == "demo":
        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        try:
            run_demo(cfg)
        except ValueError as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
