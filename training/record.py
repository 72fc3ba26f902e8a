"""A training run folder is a record: ``config.json`` holds the settings its checkpoints were trained with, and
``history.jsonl`` every start, resume and extension. Resuming with other settings is refused before anything is
written; a longer run is an explicit extension (``scdino-train --extend``), recorded in the history."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from scdino.errors import ConfigError
from scdino.outputs import MARKER
from scdino.training.config import TrainConfig

log = logging.getLogger(__name__)

#: settings that change neither the weights nor the schedule: a resumed run may change them
FREE = frozenset(
    {"out", "threads", "device", "knn_freq", "val_data", "val_label_key", "saveckp_freq", "activation_checkpointing"}
)


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples as lists, as config.json holds them


def numbered_checkpoints(out: Path) -> list[Path]:
    """The run's ``checkpointNNNN.pth`` files, oldest first."""
    return sorted(out.glob("checkpoint[0-9][0-9][0-9][0-9].pth"))


def fallback_hint(out: Path) -> str:
    """What to do when ``checkpoint.pth`` cannot be used: copy the last numbered checkpoint over it, or a new --out."""
    saved = numbered_checkpoints(out)
    if not saved:
        return "there is no numbered checkpointNNNN.pth to fall back on: start a new --out"
    return (
        f"the last numbered one is {saved[-1]}: copy it to {out / 'checkpoint.pth'} to resume after epoch "
        f"{int(saved[-1].stem[-4:])}, or start a new --out"
    )


def trained(out: Path) -> bool:
    """Whether the run folder holds a checkpoint (something was trained under its settings)."""
    return (out / "checkpoint.pth").is_file() or bool(numbered_checkpoints(out))


def run_settings(out: Path) -> dict | None:
    """The settings the run in ``out`` trains with: its ``config.json`` (a setting it lacks, written by an older scdino,
    at that setting's default) and the extensions in its history (None for a new run)."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc}); start a new --out") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected the run's settings as a JSON object; start a new --out")
    saved = {**_plain(TrainConfig().to_dict()), **saved}
    for rec in history(out):
        if rec.get("event") == "extend":
            saved["epochs"] = rec["epochs"]
    return saved


def history(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{i}: not a JSON record (cut short?); remove that line to go on") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def check(cfg: TrainConfig, extend: bool = False) -> tuple[TrainConfig, str]:
    """The settings to train with and what this command does (``start``, ``restart``, ``resume``, ``extend``, or
    ``adopt``: a folder of checkpoints without config.json),
    checked against the run already in ``cfg.out``; raises :class:`ConfigError` naming every differing setting."""
    out = Path(cfg.out)
    saved = run_settings(out)
    if saved is None and trained(out):  # a run of an older scdino: nothing to check against, from now on recorded
        log.warning("%s: holds checkpoints but no config.json; its settings cannot be checked, these are recorded", out)
        return cfg, "adopt"
    if saved is None or not trained(out):
        if extend:
            raise ConfigError(f"{out}: --extend continues a run, and this folder holds no trained checkpoint yet")
        return cfg, "start" if saved is None else "restart"
    now = _plain(cfg.to_dict())
    differ = {k: (saved.get(k), v) for k, v in now.items() if k not in FREE and saved.get(k) != v}
    epochs = differ.pop("epochs", None)
    if extend:
        if epochs is None or epochs[1] <= epochs[0]:
            raise ConfigError(f"{out}: --extend needs more --epochs than the run's {saved['epochs']}")
        differ.pop("warmup_epochs", None)  # a derived value (a tenth of a short run): the run keeps its own
        cfg = dataclasses.replace(cfg, warmup_epochs=saved["warmup_epochs"])
    elif epochs is not None:
        differ["epochs"] = epochs
    if differ:
        lines = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(differ.items()))
        more = (
            " (to train longer, pass --extend with the new --epochs and otherwise the same settings)"
            if set(differ) <= {"epochs", "warmup_epochs"}
            else ""
        )
        raise ConfigError(
            f"{out}: holds a run trained with other settings ({lines}); its checkpoints belong to {out / 'config.json'}. "
            f"Resume with the run's settings (scdino-train --config {out / 'config.json'} --out {out}) or start a new "
            f"--out{more}"
        )
    return cfg, "extend" if extend else "resume"


def write(cfg: TrainConfig, action: str) -> None:
    """Write ``config.json`` for a new run and add this command to the history."""
    out = Path(cfg.out)
    if action in ("start", "restart", "adopt"):
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rec = {"event": action, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "epochs": cfg.epochs}
    with open(out / "history.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def forget(out: Path, fresh: bool, marked: bool) -> None:
    """Undo :func:`write` of a run that never started (its data were refused): ``config.json`` and ``history.jsonl``
    go, the marker where the folder had none before (``marked`` False), and the folder itself where this command made
    it (``fresh``) and nothing else is in it."""
    for name in ("config.json", "history.jsonl"):
        (out / name).unlink(missing_ok=True)
    if not marked:
        (out / MARKER).unlink(missing_ok=True)
    if fresh and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
