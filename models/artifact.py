"""Model artifacts: a directory with ``manifest.json`` and ``weights.safetensors`` (never pickle).

The manifest records kind and hyper-parameters, window, hop, channel names, normalisation, the
validation-error quantiles (and each channel's median validation error) and the default threshold, the
training data summary and hash, versions and creation time, plus the weights' sha256 so that corruption and
truncation are caught at load time.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models import __version__, beats
from models.base import LOSSES
from models.detector import Detector, Threshold
from models.errors import ArtifactError, DataError, ModelConfigError, number, numbers, short_repr
from models.files import check_writable, leftovers, locked_dir, read_limited, write_bytes_atomically
from models.registry import build
from models.scaling import Scaler

FORMAT = "tsmon-model"
FORMAT_VERSION = 3  # 2: `downsample` (and beat windows), 3: the lstm's `reverse`; an artifact without them is still 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is kilobytes: a multi-GB file named so is not read whole
MAX_INT = 2**63 - 1  # any integer a manifest holds
MAX_HOP = 2**31 - 1
REQUIRED = ("kind", "params", "window", "hop", "channels", "loss", "normalisation",
            "validation_error_quantiles", "threshold", "weights")


def weights_blob(state: dict[str, torch.Tensor], kind: str) -> bytes:
    """The safetensors bytes of ``state``: one metadata key, since safetensors writes several in a per-process hash
    order — the same weights gave another file and sha256 (the model version in alert ids) run after run."""
    return st_save(state, metadata={"format": f"{FORMAT}/{kind}"})


def _format_version(params: dict[str, Any], downsample: int, windowing: dict[str, Any]) -> int:
    """The lowest format that holds the artifact, so that an older tsmon still reads what it can score right
    and refuses the rest in one line ("reads up to N") instead of scoring it wrong: every field that changes the
    windows or the scores raises it. Beat windows came with format 2's readers; a tsmon from before read a beat
    artifact as format 1 and cut sliding windows every `hop` samples (195 of 199 windows over the threshold)."""
    if params.get("reverse"):  # an older tsmon would not know the key (and an lstm decoding reversed is another model)
        return 3
    return 2 if downsample > 1 or windowing.get("kind", "sliding") != "sliding" else 1


def check_target(path: str | Path) -> None:
    """``path`` may take an artifact: a new directory, or one holding a tsmon artifact (replaced), or an empty
    one — never another program's directory (a `manifest.json` of a web app beside its notes was replaced), never a
    file; in a folder this process may write to. Called before training, not after its minutes of work."""
    out = Path(path)
    check_writable(out, "artifact directory", directory=True)
    others = [] if not out.is_dir() else [p for p in out.iterdir() if not (  # what a folder may hold besides ours:
        p.name.startswith(".") or p.name in ("lost+found", WEIGHTS))]  # a .gitkeep, a fresh volume, a killed save's
    if others:
        try:
            is_ours = json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_ours = False
        if not is_ours:
            raise ArtifactError(f"{out} is a directory that holds no tsmon artifact: give a new or empty one")


def save(detector: Detector, path: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write ``detector`` to the directory ``path`` (created; an existing artifact there is replaced whole).

    The manifest is serialised before anything is written and both files are flushed to disk and renamed into
    place only once complete: a failure (a value JSON cannot hold, a full disk) leaves the previous artifact as it
    was. A save killed between its two renames leaves new weights beside the old manifest, which :func:`load`
    refuses (their sha256 differs) — never a pair taken for good.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.model.state_dict().items()}
    blob = weights_blob(state, detector.kind)
    params = detector.model.config.to_dict()
    if params.get("reverse") is False:  # the classic order, as an artifact without the key means: any tsmon reads it
        del params["reverse"]
    manifest = {
        "format": FORMAT,
        "format_version": _format_version(params, detector.downsample, detector.windowing),
        "kind": detector.kind,
        "params": params,
        "window": detector.window,
        "hop": detector.hop or detector.window,
        "windowing": detector.windowing,
        "downsample": detector.downsample,
        "channels": detector.channel_names or detector.names,
        "loss": detector.loss,
        "normalisation": detector.scaler.to_dict(),
        "validation_error_quantiles": detector.quantiles,
        **({"validation_channel_error_median": detector.channel_usual} if detector.channel_usual else {}),
        "threshold": {"quantile": detector.threshold.quantile, "margin": detector.threshold.margin,
                      "value": detector.threshold.value},
        "training": training or {},
        "versions": {"tsmon": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
    }
    text = json.dumps(manifest, indent=2, default=_jsonable, allow_nan=False) + "\n"
    with locked_dir(out):  # one save at a time: two trainings to one --out swapped each other's fixed-name temp files
        for stale in leftovers(out):  # of saves killed before their rename (a full weights file each)
            shutil.rmtree(stale, ignore_errors=True)
        write_bytes_atomically(out / WEIGHTS, blob)  # the weights first: a manifest never names weights not there yet
        write_bytes_atomically(out / MANIFEST, text.encode())
    return out


def _jsonable(o: object) -> object:
    if hasattr(o, "tolist"):
        return o.tolist()  # numpy scalars and arrays
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _bounded_int(text: str) -> int:
    """A manifest's integer, within int64: 10**400 as a threshold or a quantile raised OverflowError (a traceback)
    wherever it was made a float; 10**30 as the hop an IndexError in score."""
    value = int(text)
    if abs(value) > MAX_INT:
        raise ValueError(f"integer {text[:20]}... is out of range")
    return value


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of the artifact at ``path``."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"model artifact not found: {root}")
    if root.name in (MANIFEST, WEIGHTS) and root.is_file() and (root.parent / MANIFEST).is_file():
        raise ArtifactError(f"{root} is a file of the artifact: give its directory, {root.parent}")
    if not root.is_dir() or not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root} is not a tsmon model artifact (no {MANIFEST})")
    try:
        manifest = json.loads(read_limited(root / MANIFEST, "manifest", MAX_MANIFEST_BYTES, ArtifactError),
                              parse_int=_bounded_int)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"corrupt manifest {root / MANIFEST}: {exc}"[:300]) from None
    except RecursionError:  # "[" * 100 000: a traceback
        raise ArtifactError(f"corrupt manifest {root / MANIFEST}: nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root / MANIFEST} is not a tsmon model manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{root} has artifact format {version!r}; this tsmon reads up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"incompatible artifact {root}: manifest lacks {', '.join(missing)}")
    wrong = [f"{key} must be an object, got {manifest[key]!r}"[:100] for key in ("params", "normalisation", "threshold")
             if not isinstance(manifest[key], dict)]  # a hand-edited null read "'NoneType' object is not subscriptable"
    if wrong:
        raise ArtifactError(f"incompatible artifact {root}: {'; '.join(wrong)}")
    params, hop, k = manifest["params"], manifest["hop"], manifest.get("downsample", 1)  # before: always 1
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArtifactError(f"incompatible artifact {root}: downsample must be a positive integer, got {k!r}")
    manifest["downsample"] = k  # what load and every reader of the manifest take
    if not isinstance(params, dict) or not isinstance(params.get("window"), int) or params["window"] * k != manifest["window"]:
        raise ArtifactError(f"incompatible artifact {root}: window {manifest['window']!r} differs from params "
                            f"(model window × downsample {k})")
    if not isinstance(hop, int) or isinstance(hop, bool) or not 1 <= hop <= MAX_HOP:  # 1e30: score's numpy index
        raise ArtifactError(f"incompatible artifact {root}: hop must be an integer in 1..{MAX_HOP}, got {hop!r}"[:200])
    if not isinstance(manifest["kind"], str):  # a list failed in the registry: "unhashable type: 'list'"
        raise ArtifactError(f"incompatible artifact {root}: kind must be a name, got {short_repr(manifest['kind'])}")
    if manifest.get("windowing") is not None and not isinstance(manifest["windowing"], dict):  # [] was sliding
        raise ArtifactError(f"incompatible artifact {root}: windowing must be an object, got "
                            f"{short_repr(manifest['windowing'])}")
    sliding = (manifest.get("windowing") or {}).get("kind", beats.SLIDING) == beats.SLIDING  # a beat model's hop is
    if sliding and isinstance(manifest["window"], int) and hop > manifest["window"]:  # its median beat interval
        # score and eval skipped the samples between windows without a word (the daemon refused it at load)
        raise ArtifactError(f"incompatible artifact {root}: hop {hop} is longer than its window "
                            f"({manifest['window']} samples): the samples between windows would never be scored")
    if manifest["loss"] not in LOSSES:
        raise ArtifactError(f"incompatible artifact {root}: unknown loss {manifest['loss']!r}")
    wname = str(manifest["weights"].get("file", WEIGHTS)) if isinstance(manifest["weights"], dict) else ""
    if not wname or Path(wname).name != wname:
        raise ArtifactError(f"incompatible artifact {root}: weights file must be a plain name inside it, got {wname!r}")
    return manifest


def load(path: str | Path, device: str = "auto", expect_channels: int | None = None) -> Detector:
    """Load an artifact; every failure is an :class:`ArtifactError` with a one-line reason."""
    root = Path(path)
    m = read_manifest(root)
    wfile = root / str(m["weights"].get("file", WEIGHTS))
    if not wfile.exists():
        raise ArtifactError(f"artifact {root} is missing its weights file {wfile.name}")
    if not wfile.is_file():
        raise ArtifactError(f"weights {wfile} are not a regular file")
    size, expected = wfile.stat().st_size, m["weights"].get("bytes")
    if isinstance(expected, int) and size != expected:  # before reading it: a 1 GiB file was read whole first
        raise ArtifactError(f"weights {wfile} are {size} bytes, the manifest says {expected}: corrupt, truncated "
                            "or from another save")
    try:
        blob = wfile.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read weights {wfile}: {exc.strerror or exc}") from None
    if not isinstance(m["weights"].get("sha256"), str):
        raise ArtifactError(f"incompatible artifact {root}: the manifest gives no sha256 of its weights")
    if hashlib.sha256(blob).hexdigest() != m["weights"]["sha256"]:
        raise ArtifactError(f"weights {wfile} are corrupt, truncated or from another save (sha256 does not match the "
                            "manifest)")
    try:
        state = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError(f"cannot read weights {wfile}: {exc}") from None
    odd = [f"{name} ({t.dtype})" for name, t in state.items()
           if t.dtype != torch.float32 and not (name.endswith("num_batches_tracked") and t.dtype == torch.int64)]
    if odd:  # float16 PCA weights failed at the first score in a matmul; bool ones scored around 1e7
        raise ArtifactError(f"weights {wfile} are not float32: {', '.join(odd[:3])}")
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # every score would be NaN: nothing would ever be called anomalous
        raise ArtifactError(f"weights {wfile} hold NaN or inf ({', '.join(bad[:3])}): retrain the model")
    try:
        with torch.device("meta"):  # shapes only, nothing allocated: checked against the weights before the model is
            shapes = build(m["kind"], dict(m["params"])).state_dict()  # built (params of a hand-edited manifest
        _fits(root, m["kind"], shapes, state)  # asked for 12 GiB before the weights were found not to fit)
        model = build(m["kind"], dict(m["params"]))
        scaler = Scaler.from_dict(m["normalisation"])
        threshold = _threshold(m["threshold"])
        quantiles = m["validation_error_quantiles"]
        if not isinstance(quantiles, dict):
            raise TypeError(f"validation_error_quantiles must be an object, got {quantiles!r}"[:200])
        quantiles = {str(q): number(v, f"validation_error_quantiles[{q!r}]") for q, v in quantiles.items()}
        if not all(math.isfinite(v) and v >= 0 for v in quantiles.values()):  # errors are finite and >= 0
            raise ValueError(f"validation_error_quantiles must be finite errors >= 0, got {quantiles}"[:200])
        if not isinstance(m.get("training", {}), dict):  # eval and inspect read its data summary
            raise TypeError(f"training must be an object, got {m['training']!r}"[:200])
        if not isinstance(m.get("training", {}).get("data", {}), dict):  # bench, replay-eval read it too
            raise TypeError(f"training.data must be an object, got {m['training']['data']!r}"[:200])
        names = m["channels"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise TypeError(f"channels must be a list of names, got {names!r}")
        usual = _channel_usual(m.get("validation_channel_error_median", []), len(names))
    except KeyError as exc:
        raise ArtifactError(f"incompatible artifact {root}: manifest lacks {exc}") from None
    except (ModelConfigError, TypeError, ValueError) as exc:  # (no float(10**400): read_manifest bounds integers)
        raise ArtifactError(f"incompatible artifact {root}: {exc}"[:300]) from None
    d = model.config.window * model.config.channels
    for name, buf in state.items():  # PCA buffers are sized at fit time: only the components' count is free
        if name in ("mean", "components"):
            if buf.shape[-1] != d or buf.dim() != (1 if name == "mean" else 2):
                raise ArtifactError(f"weights in {root} do not fit a {m['kind']} model with its params: {name} "
                                    f"has shape {list(buf.shape)} for windows of {d} values")
            setattr(model, name, torch.empty_like(buf))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ").replace("\t", "")[:300]
        raise ArtifactError(f"weights in {root} do not fit a {m['kind']} model with its params: {first}") from None
    channels = model.config.channels
    if scaler.channels != channels or len(names) != channels:
        raise ArtifactError(f"incompatible artifact {root}: normalisation/channel names disagree with {channels} channels")
    if expect_channels is not None and expect_channels != channels:
        raise ArtifactError(f"model {root} expects {channels} channel(s), the data has {expect_channels}")
    windowing = m.get("windowing") or {"kind": beats.SLIDING}  # artifacts before beat windows: sliding
    try:
        rule = beats.rule_of(windowing)
    except DataError as exc:
        raise ArtifactError(f"incompatible artifact {root}: {exc}") from None
    k = m["downsample"]
    if rule is not None and (rule.window != model.config.window * k or rule.lead >= channels):
        raise ArtifactError(f"incompatible artifact {root}: beat window {rule.window} / lead {rule.lead} do not "
                            f"fit the model")
    det = Detector(model, scaler, threshold, quantiles, str(m["loss"]), list(names), int(m["hop"]), meta=m,
                   windowing=dict(windowing), downsample=k, channel_usual=usual)
    return det.to(device)


def _channel_usual(doc: object, channels: int) -> list[float]:
    """The median validation error of each channel (absent from artifacts before it: ``[]``, alerts then rank
    channels by their raw error): one finite value >= 0 per channel."""
    if not isinstance(doc, list) or (doc and len(doc) != channels):
        raise TypeError(f"validation_channel_error_median must be a list of {channels} error(s), got {doc!r}"[:200])
    usual = list(numbers(doc, "validation_channel_error_median"))
    if not all(math.isfinite(v) and v >= 0 for v in usual):
        raise ValueError(f"validation_channel_error_median must be finite errors >= 0, got {usual}"[:200])
    return usual


def _fits(root: Path, kind: str, shapes: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """The weights have the tensors, of the shapes, that the manifest's params make (PCA's fitted buffers aside)."""
    want = {k: tuple(t.shape) for k, t in shapes.items() if k not in ("mean", "components")}
    have = {k: tuple(t.shape) for k, t in state.items() if k not in ("mean", "components")}
    if "components" in shapes and "components" in state and shapes["components"].shape[0] != state["components"].shape[0]:
        # PCA records its fitted count: a hand-edited 10 000 000 allocated 1.1 GB before anything was compared
        raise ArtifactError(f"weights in {root} do not fit a {kind} model with its params: params.components is "
                            f"{shapes['components'].shape[0]}, the weights hold {state['components'].shape[0]}")
    if want != have:
        diff = sorted((set(want.items()) ^ set(have.items())), key=str)[:2]
        raise ArtifactError(f"weights in {root} do not fit a {kind} model with its params: {diff}"[:300])


def _threshold(doc: dict[str, Any]) -> Threshold:
    """The manifest's default threshold: a finite value > 0, a quantile in (0, 1], a finite margin > 0."""
    quantile, margin, value = (number(doc[key], f"threshold.{key}") for key in ("quantile", "margin", "value"))
    if not (0.0 < quantile <= 1.0 and 0.0 < margin < math.inf and 0.0 < value < math.inf):
        raise ValueError(f"threshold must have a quantile in (0, 1], a finite margin > 0 and a finite value > 0, "
                         f"got {quantile}, {margin}, {value}")
    return Threshold(quantile, margin, value)
