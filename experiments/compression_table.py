"""The table of ``experiment=compression``: each job's engine and gradient compression, samples/s, bytes per
round and accuracy, as Markdown (also written to ``compression.md`` in the sweep folder).

    python experiments/compression_table.py multirun/<date>/<time>

Bytes per optimizer step: for the parameter server, the medians ``parameter_server/report.json`` measured
on the wire, all workers together (gradients from the workers; parameters and assignments to them); for
DDP, what the ranks together hand to the gradient all-reduce per step, computed from the model and the
hook, marked "computed" (gloo's ring all-reduce sends and receives about twice that per rank on the wire).
Samples/s: training images per epoch over the mean seconds per epoch (validation included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf

DATASET_IMAGES = {"cifar10": 50_000, "fashion_mnist": 60_000}  # training files, before the validation hold-out


def ddp_bytes_per_step(module: Any, compression: str, rank: int) -> int:
    """Bytes one rank contributes to the gradient all-reduce per step with this hook (PowerSGD: after its
    warm-up; a tensor it would not shrink at least twofold, or a vector, goes uncompressed, as torch does)."""
    total = 0
    for p in module.parameters():
        n = p.numel()
        if compression in ("fp16", "bf16"):
            total += 2 * n
        elif compression == "powersgd" and p.dim() > 1:
            rows, cols = p.shape[0], n // p.shape[0]
            r = min(rank, rows, cols)
            total += 4 * (rows + cols) * r if rows * cols >= 2 * (rows + cols) * r else 4 * n
        else:
            total += 4 * n
    return total


def row(job: Path) -> dict[str, Any] | None:
    metrics_file = job / "metrics.json"
    if not metrics_file.exists():
        return None
    metrics = json.loads(metrics_file.read_text())
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    engine = "parameter server" if "parameter_server" in cfg.strategy.get("_target_", "") else "DDP"
    compression = cfg.strategy.get("compression", "none")
    if engine == "parameter server" and compression == "topk":
        compression = f"topk {cfg.strategy.topk_ratio:g}"
    images = int(cfg.data.options.train_size) if cfg.data.dataset == "synthetic" else DATASET_IMAGES[cfg.data.dataset]
    samples = images - int(cfg.data.val_size)
    seconds = metrics.get("seconds_per_epoch")
    to_workers = gradients = ""
    report_file = job / "parameter_server" / "report.json"
    if report_file.exists():
        moved = json.loads(report_file.read_text()).get("bytes_per_round") or {}
        gradients, to_workers = f"{moved.get('from_workers', 0):,.0f}", f"{moved.get('to_workers', 0):,.0f}"
    elif engine == "DDP":
        from hydra.utils import instantiate

        model = instantiate(cfg.model, _convert_="all")
        per_rank = ddp_bytes_per_step(model, compression, int(cfg.strategy.get("powersgd_rank", 1)))
        ranks = int(cfg.trainer.get("devices", 1)) * int(cfg.trainer.get("num_nodes", 1))
        gradients, to_workers = f"{per_rank * ranks:,} (computed)", "none (no central copy)"
    return {
        "job": job.name.split("_", 1)[0],
        "engine": engine,
        "gradients": compression,
        "status": metrics.get("status", "?"),
        "epochs": metrics.get("epochs", ""),
        "samples/s": f"{samples / seconds:,.0f}" if seconds else "",
        "gradient bytes / step": gradients,
        "bytes to workers / step": to_workers,
        "test acc %": f"{100 * metrics['test/acc']:.2f}" if "test/acc" in metrics else "",
        "best val acc %": f"{100 * metrics['best_val/acc']:.2f}" if "best_val/acc" in metrics else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder of experiment=compression")
    args = parser.parse_args(argv)
    jobs = sorted((p for p in args.sweep_dir.iterdir() if p.is_dir() and p.name[:1].isdigit()), key=lambda p: p.name)
    rows = [r for r in map(row, jobs) if r is not None]
    if not rows:
        print(f"error: no job with a metrics.json in {args.sweep_dir}", file=sys.stderr)
        return 2
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    (args.sweep_dir / "compression.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
