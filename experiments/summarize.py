"""Summarise a Hydra multirun: results.csv, results.md and plots, written into the sweep directory.

    python experiments/summarize.py multirun/<date>/<time>

train.py does this by itself when a multirun ends; run it again after editing or re-running jobs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar_pl.sweeps import report, summarize_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        summary = summarize_sweep(args.sweep_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
