"""`ddm` console script. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
modules are imported only when their command runs, so `ddm --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from ddm import run_reporting_usage_errors

COMMANDS = {
    "encode": ("ddm.data.encode", "encode an image folder with a local VAE into a latent cache"),
    "partition": ("ddm.partition.cluster", "cluster a data set into K islands and write a manifest"),
    "train": ("ddm.training.train", "train one island's expert (or the monolith with --island all)"),
    "train-router": ("router.train", "train the router that predicts the island of a noisy sample"),
    "sample": ("router.sample", "sample an image grid through the router ensemble"),
    "eval": ("evaluation.images", "FID, accuracy and class coverage of samples"),
    "eval-video": ("evaluation.video_metrics", "fidelity, flicker, seam and drift scores of rendered videos"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddm", description="Decentralized diffusion training (DDM) and DualParal long-video tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return run_reporting_usage_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
