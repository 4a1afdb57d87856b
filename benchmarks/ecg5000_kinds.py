"""Train every model kind with its defaults on ECG5000 and print one table beside the PCA baseline.

    .venv/bin/python benchmarks/ecg5000_kinds.py [--protocol classic|ucr] [--kinds lstm,dense,...] [--json]

Thresholds come from validation normals only; the test split is never used for any choice.
"""

from __future__ import annotations

import argparse
import json
import time

from models.data import load_ecg5000
from models.registry import KINDS, train_defaults
from models.train import TrainConfig
from models.workflow import evaluate, train_detector

KEYS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "precision", "recall", "f1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="classic")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ds = load_ecg5000(args.protocol, 42)
    rows = []
    for kind in args.kinds.split(","):
        start = time.perf_counter()
        det, info = train_detector(ds, kind, {}, TrainConfig(**train_defaults(kind), seed=args.seed))
        secs = time.perf_counter() - start
        r = evaluate(det, ds, with_baseline=False)
        rows.append({"kind": kind, "train_s": round(secs, 1), "epochs": info["result"]["epochs_run"],
                     **{k: round(r[k], 4) for k in KEYS}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = ["kind", "train_s", "epochs", *KEYS]
    print(f"ECG5000 {args.protocol} (seed {args.seed}); test {len(ds.test)} beats, {int(ds.test_labels.sum())} abnormal")
    print(" | ".join(f"{h:>17}" for h in head))
    for row in rows:
        print(" | ".join(f"{row[h]!s:>17}" for h in head))


if __name__ == "__main__":
    main()
