"""Train the default model on each real signal's warm-up part and replay-evaluate it beside PCA.

Reproduces the README's "Real signals" table. Data: ``../shared/data`` (MIT-BIH record 100 and four NAB
series; not part of the product). Settings are chosen per kind of signal, never per series, and never on
the test part: see README "Recommended settings per signal type" (ECG: ``for = 1`` in the daemon config,
one abnormal beat being the event; ``--defaults`` replays every signal with the daemon's defaults).

    .venv/bin/python benchmarks/replay_signals.py [--only NAME ...] [--out runs/replay-signals] [--train-arg=ARG ...]

Prints one JSON line per signal (model and baseline figures, training seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAB = DATA / "nab"
SENSOR = ["--window", "48", "--hop", "4", "--train-fraction", "0.15", "--normalisation", "robust",
          "--windows", str(NAB / "combined_windows.json"), "--out-of-order", "drop"]
MITDB = Path("runs/mitdb100.csv")  # written by benchmarks/prepare_mitdb.py (first run)
ECG = ["--align", "beats", "--window", "360", "--train-fraction", "0.166", "--max-minutes", "6",  # 1 s beats, 5 min
       "--threshold-quantile", "0.999"]  # the page rate per beat under for = 1 (README: recommended settings)
SIGNALS: dict[str, dict[str, list[str]]] = {
    "mitdb100-MLII": {"data": [str(MITDB)], "train": [*ECG, "--value-col", "MLII"],
                      "replay": ["--sample-rate", "360", "--value-col", "MLII"]},
    "mitdb100-MLII+V5": {"data": [str(MITDB)], "train": [*ECG, "--value-col", "MLII", "--value-col", "V5"],
                         "replay": ["--sample-rate", "360", "--value-col", "MLII", "--value-col", "V5"]},
    **{name: {"data": [str(NAB / f"{name}.csv")], "train": SENSOR, "replay": ["--windows", str(NAB / "combined_windows.json")]}
       for name in ("machine_temperature_system_failure", "ambient_temperature_system_failure", "nyc_taxi",
                    "ec2_request_latency_system_failure")},
}
# Daemon settings per signal (README "Recommended settings"): one abnormal beat is the event and lies in one
# beat window only, so ECG pages on a single window, and the quantile is then the page rate per beat: q0.999
# (q0.95 paged 3-4 normal beats a minute, the stream flapped and one alert stayed open 99 % of the record), with
# a calibrator window whose tail holds entries at that quantile. A route's own `for` is not carried by
# replay-eval (its routes are the run's own), hence the daemon-wide keys here.
CONFIGS = {name: "[alerts]\nfor = 1\n\n[calibrator]\nquantile = 0.999\nwindow = 10000\n"
           for name in ("mitdb100-MLII", "mitdb100-MLII+V5")}


def tsmon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", "--log-level", "WARNING", *args], capture_output=True,
                          text=True, check=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("runs/replay-signals"))
    ap.add_argument("--seconds", default="30")
    ap.add_argument("--reuse", action="store_true", help="replay-evaluate models already trained under --out")
    ap.add_argument("--defaults", action="store_true", help="daemon defaults for every signal (ECG: for = 2)")
    ap.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                    help="passed on to every `tsmon train` (repeat; e.g. --train-arg=--param --train-arg=embedding=64)")
    a = ap.parse_args()
    if not MITDB.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("prepare_mitdb.py")), "--out", str(MITDB)],
                       check=True)
    for name, s in SIGNALS.items():
        if a.only and name not in a.only:
            continue
        model = a.out / name / "model"
        if not (a.reuse and (model / "manifest.json").exists()):
            p = tsmon("train", "--data", *s["data"], *s["train"], *a.train_arg, "--out", str(model))
            if p.returncode:
                sys.exit(f"{name}: training failed: {p.stderr[-1000:]}")
        config: list[str] = []
        if name in CONFIGS and not a.defaults:
            (a.out / name / "daemon.toml").write_text(CONFIGS[name])
            config = ["--config", str(a.out / name / "daemon.toml")]
        p = tsmon("replay-eval", "--model", str(model), "--data", *s["data"], *s["replay"], *config,
                  "--seconds", a.seconds, "--out", str(a.out / name), "--json")
        if p.returncode:
            sys.exit(f"{name}: replay-eval failed: {p.stderr[-1000:]}")
        r = json.loads(p.stdout)
        keys = ("recall", "precision", "false_alerts_per_hour", "false_alerts_per_day", "mean_delay_s",
                "p90_delay_s", "alerts", "time_in_alert", "events_inside_open_alert")
        train_s = json.loads((model / "manifest.json").read_text())["training"]["result"]["seconds"]
        row = {"signal": name, "config": CONFIGS[name] if config else None, "train_s": round(train_s, 1),
               "events": r["events"], "test_hours": round(r["data"]["test_hours"], 1),
               "model": {k: r[k] for k in keys}, "baseline": {k: r["baseline"][k] for k in keys}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
