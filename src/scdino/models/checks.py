"""The checks a run's inputs get against a model (the channels it gives), and how messages name a model."""

from __future__ import annotations

from typing import Sequence

from scdino.data import PACKAGED_MODELS
from scdino.errors import ConfigError


def display_name(spec: str) -> str:
    """How messages name a model: ``default`` is "the default model", anything else its spec."""
    if spec == "default":
        return "the default model"
    return f"the packaged model {spec}" if spec in PACKAGED_MODELS else spec


def check_channels(
    model: str,
    in_chans: int | None,
    trained_on: Sequence[str] | None,
    n_channels: int,
    selected: Sequence[str] | None = None,
    available: Sequence[str] | None = None,
    option: str = "--channels",
) -> None:
    """The one check of the channels a run gives a model: the names it was trained on (where both are known), then
    the count it needs. ``available`` are all the channels of the data, for the advice; ``option`` is the option that
    selects channels in the command that asks (evaluate's is --channel-sets)."""
    name = display_name(model)
    if trained_on and selected is not None and list(trained_on) != list(selected):
        have = list(available) if available is not None else list(selected)
        missing = [c for c in trained_on if c not in have]
        hint = (
            f"pass {option} {','.join(trained_on)}"
            if not missing
            else "this plate lacks them: pass --model with a model for its channels (e.g. dino_vits16, adapted to any "
            "channels, or one trained with scdino-train)"
        )
        raise ConfigError(
            f"{name}: trained on channels {', '.join(trained_on)}, the run selects {', '.join(selected)}; {hint}"
        )
    if in_chans is not None and in_chans != n_channels:
        expect = f" ({', '.join(trained_on)})" if trained_on else ""
        raise ConfigError(
            f"{name}: the model expects {in_chans} channels{expect}, the data give {n_channels}; "
            f"pass {option} to select them"
        )
