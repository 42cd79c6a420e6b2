"""`python -m evf_sam COMMAND ...`: predict | train | eval | bench.

Each command lives in its own module exposing `configure_parser(parser)` and `main(args) -> int`; only the chosen
module is imported, so `--help` and light commands start fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Sequence

from evf_sam.errors import EvfError

COMMANDS = {
    "predict": ("evf_sam.cli_predict", "segment an image with text prompts; writes mask PNGs and an overlay"),
    "train": ("evf_sam.cli_train", "fine-tune a checkpoint on a dataset directory (images/, masks/, records.jsonl)"),
    "eval": ("evf_sam.evaluate", "measure cIoU / gIoU of a checkpoint on a dataset directory"),
    "bench": ("evf_sam.bench", "GPU throughput against an official-style baseline"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m evf_sam", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="EVF-SAM / EVF-SAM2: text-prompted segmentation.",
        epilog=f"commands:\n{lines}\n\nRun `python -m evf_sam COMMAND --help` for the options of a command.")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the command, return its exit status."""
    top = _top_parser().parse_args(argv)
    module_name, summary = COMMANDS[top.command]
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"python -m evf_sam {top.command}: not available in this version ({module_name} is not installed)",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"python -m evf_sam {top.command}", description=module.__doc__ or summary,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure_parser(parser)
    args = parser.parse_args(top.args)
    try:
        return int(module.main(args) or 0)
    except EvfError as error:  # a command that let one through still answers in one line
        print(f"python -m evf_sam {top.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"python -m evf_sam {top.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
