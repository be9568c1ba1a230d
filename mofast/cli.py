"""The `mofast` command line: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen, so `mofast toy` never pays for transformers.
"""

import argparse
import importlib
import logging
import sys

import yaml

logger = logging.getLogger(__name__)

SUBCOMMANDS = {
    "train": ("mofast.train", "multi-objective DPO training (default: the embedded real run)"),
    "toy": ("mofast.toy", "the two-objective toy problem of SPEC section 3"),
    "eval": ("mofast.evaluation", "generate on held-out prompts and judge against golden"),
    "report": ("mofast.report", "win/tie/loss tables with bootstrap significance"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mofast", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    module_name, help_text = SUBCOMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"mofast {args.command}", description=help_text)
    module.add_arguments(sub_parser)
    sub_args = sub_parser.parse_args(rest)
    try:
        return int(module.run(sub_args) or 0)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        # Bad input (a config value, a missing file or model, unparsable YAML, a hub that
        # cannot be reached) is the user's to fix: one line naming it, the traceback only at
        # --log-level DEBUG.
        logger.debug("traceback", exc_info=True)
        where = ""
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # A failed write ("[Errno 28] No space left on device") names no file: say how
            # to see which one.
            where = f" (mofast --log-level DEBUG {args.command} ... shows where)"
        sub_parser.exit(2, f"{sub_parser.prog}: error: {exc}{where}\n")
    except KeyboardInterrupt:
        # Checkpoints are written whole or not at all, so an interrupted run resumes cleanly.
        sub_parser.exit(130, f"{sub_parser.prog}: interrupted\n")
