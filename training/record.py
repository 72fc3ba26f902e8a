"""A training run folder is a record: ``config.json`` holds the settings its checkpoints were trained with, and
``history.jsonl`` every start, resume and extension. Resuming with other settings is refused before anything is
written; a longer run is an explicit extension (``scdino-train --extend``), recorded in the history."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from scdino.errors import ConfigError
from scdino.training.config import TrainConfig

#: settings that change neither the weights nor the schedule: a resumed run may change them
FREE = frozenset({"out", "threads", "device", "knn_freq", "val_data", "val_label_key", "saveckp_freq"})


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples as lists, as config.json holds them


def trained(out: Path) -> bool:
    """Whether the run folder holds a checkpoint (something was trained under its settings)."""
    return (out / "checkpoint.pth").is_file() or any(out.glob("checkpoint[0-9][0-9][0-9][0-9].pth"))


def run_settings(out: Path) -> dict | None:
    """The settings the run in ``out`` trains with: its ``config.json`` and the extensions in its history (None for a
    new run)."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc}); start a new --out") from exc
    for rec in history(out):
        if rec.get("event") == "extend":
            saved["epochs"] = rec["epochs"]
    return saved


def history(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(cfg: TrainConfig, extend: bool = False) -> tuple[TrainConfig, str]:
    """The settings to train with and what this command does (``start``, ``restart``, ``resume`` or ``extend``),
    checked against the run already in ``cfg.out``; raises :class:`ConfigError` naming every differing setting."""
    out = Path(cfg.out)
    saved = run_settings(out)
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
        cfg = dataclasses.replace(cfg, warmup_epochs=saved.get("warmup_epochs", cfg.warmup_epochs))
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


def write(cfg: TrainConfig, action: str, from_epoch: int | None = None) -> None:
    """Write ``config.json`` for a new run and add this command to the history."""
    out = Path(cfg.out)
    if action in ("start", "restart"):
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rec = {"event": action, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "epochs": cfg.epochs}
    if from_epoch is not None:
        rec["from_epoch"] = from_epoch
    with open(out / "history.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
