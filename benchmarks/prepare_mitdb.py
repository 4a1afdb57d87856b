"""MIT-BIH record 100 as a labelled CSV for `tsmon train` / `tsmon replay-eval`.

Reads ``../shared/data/mitdb100`` (development data, not part of the product; origin and licence in its
README: MIT-BIH Arrhythmia Database, ODC-By, cite Moody & Mark 2001 and Goldberger et al. 2000) and writes
``sample,MLII,V5,label`` at 360 Hz: label 1 within ±0.25 s (90 samples) of every beat annotated other than
``N`` (33 atrial premature beats ``A`` and one ventricular ``V``); the rhythm annotation ``+`` is not a beat.

    .venv/bin/python benchmarks/prepare_mitdb.py --out runs/mitdb100.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mitdb100"
HALF = 90  # samples either side of an abnormal beat's R peak (±0.25 s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/mitdb100.csv"))
    a = ap.parse_args()
    sig = pd.read_csv(SRC / "100_signals.csv.gz")
    ann = pd.read_csv(SRC / "100_annotations.csv", keep_default_na=False)
    abnormal = ann[(ann.symbol != "N") & (ann.symbol != "+")]["sample"].to_numpy()
    label = np.zeros(len(sig), "int8")
    for s in abnormal:
        label[max(0, s - HALF) : s + HALF + 1] = 1
    sig["label"] = label
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sig.to_csv(a.out, index=False)
    print(f"{a.out}: {len(sig)} samples, {len(abnormal)} abnormal beats, {int(label.sum())} labelled samples")


if __name__ == "__main__":
    main()
