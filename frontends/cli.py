"""`ddm` console script. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
modules are imported only when their command runs, so `ddm --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from ddm import OneLineParser, __version__, run_reporting_usage_errors

COMMANDS = {
    "encode": ("ddm.data.encode", "encode an image folder with a local VAE into a latent cache"),
    "partition": ("ddm.partition.cluster", "cluster a data set into K islands and write a manifest"),
    "train": ("ddm.training.train", "train one island's expert (or the monolith with --island all)"),
    "train-router": ("router.train", "train the router that predicts the island of a noisy sample"),
    "sample": ("router.sample", "sample an image grid through the router ensemble"),
    "eval": ("evaluation.images", "FID, accuracy and class coverage of samples"),
    "eval-video": ("evaluation.video_metrics", "fidelity, flicker, seam and drift scores of rendered videos"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except None/False (nothing to show) and where the help line already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(load: set[str] | None = None) -> argparse.ArgumentParser:
    """The `ddm` parser; the options of the commands in `load` (all when None) are filled in."""
    parser = OneLineParser(prog="ddm", description="Decentralized diffusion training (DDM) and DualParal long-video tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if load is None or name in load:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser({chosen}).parse_args(argv)
    return run_reporting_usage_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
