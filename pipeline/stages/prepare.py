"""Stage ``prepare``: source digits -> data/prepared/{train,test}.pt and summary.json."""

from __future__ import annotations

from pathlib import Path

from pipeline import data
from pipeline.config import Params


def run(params: Params) -> dict:
    splits, summary = data.prepare(params.data, params.paths.raw_dir)
    out = Path(params.paths.prepared_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        data.save_split(split, out / f"{name}.pt")
    data.write_summary(summary, out / "summary.json")
    counts = ", ".join(f"{k}={v['count']}" for k, v in summary["splits"].items())
    print(f"prepare: {params.data.source} -> {out} ({counts})")
    return summary
