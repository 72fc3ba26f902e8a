"""The docs show the code's defaults: every ``[--option VALUE]`` on a command line in README.md and docs/*.md is that
option's default, read from the command (or, where the option has none of its own, from the config field it sets)."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict:
    from scdino.engine.cli import main as engine
    from scdino.engine.config import RunConfig
    from scdino.export.cli import main as export
    from scdino.training.cli import main as train
    from scdino.training.config import TrainConfig

    return {"scdino-engine": (engine, RunConfig), "scdino-export": (export, None), "scdino-train": (train, TrainConfig)}


def _config_default(config, option: str):
    for f in fields(config) if config else ():
        if f.name == option.lstrip("-").replace("-", "_"):
            return f.default if f.default is not MISSING else MISSING
    return MISSING


def documented_defaults() -> list[tuple[str, str, str, object]]:
    """(where, option, value shown, the code's default) of every ``[--option VALUE]`` of a documented command line
    (values with ``...`` are placeholders, not defaults)."""
    found = []
    commands = _commands()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            m = re.match(r"\s*(scdino-engine|scdino-train|scdino-export)\b(?: ([a-z][a-z-]*))?", line)
            if not m:
                continue
            cmd, config = commands[m[1]]
            if isinstance(cmd, click.Group):
                cmd = cmd.commands.get(m[2])
            for bracket in re.findall(r"\[([^\]]+)\]", line) if cmd else ():
                for option, value in re.findall(r"(--[a-z-]+) ([^\s\]]+)", bracket):
                    if "..." in value:
                        continue
                    param = next((p for p in cmd.params if option in getattr(p, "opts", ())), None)
                    default = param.default if param is not None and param.default is not None else MISSING
                    if default is MISSING or str(default).startswith("Sentinel"):
                        default = _config_default(config, option)
                    found.append((f"{doc.name}:{n}", option, value, default))
    return found


def _same(value: str, default) -> bool:
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return value == str(default)


def test_every_default_the_docs_show_is_the_codes():
    found = documented_defaults()
    assert {o for _, o, _, _ in found} >= {"--k", "--temperature", "--checkpoint-key", "--epochs"}
    unknown = [(w, o, v) for w, o, v, d in found if d is MISSING]
    assert unknown == []  # a value shown as a default where the code has none
    wrong = [(w, o, v, d) for w, o, v, d in found if not _same(v, d)]
    assert wrong == []


def test_the_comparison_catches_a_stale_default(monkeypatch):
    from scdino.engine.cli import main

    knn = main.commands["knn"]
    k = next(p for p in knn.params if "--k" in p.opts)
    monkeypatch.setattr(k, "default", 15)
    assert any(o == "--k" and not _same(v, d) for _, o, v, d in documented_defaults())
