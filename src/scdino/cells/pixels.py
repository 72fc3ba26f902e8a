"""The checks of pixels and labels where a source reads them: a non-finite intensity or a negative label is named
(which image, which channel, how many) instead of turning into a wrong cell table or a wrong embedding later."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from scdino.errors import InputError


def check_finite(pixels: np.ndarray, where: str, names: Sequence[str] | Callable[[], Sequence[str]]) -> None:
    """Refuse float ``pixels`` (C, Y, X) holding NaN or ±inf, naming ``where`` (the image: plate, well and field, or
    a file), the channel of ``names`` (or a function giving them: only read on failure) and how many. Integer pixels
    cannot be non-finite: nothing is checked (no cost for the usual uint8/uint16 plates)."""
    if not np.issubdtype(pixels.dtype, np.floating):
        return
    finite = np.isfinite(pixels)
    if finite.all():
        return
    names = list(names() if callable(names) else names)
    bad = (~finite).reshape(len(pixels), -1).sum(axis=1)
    c = int(np.flatnonzero(bad)[0])
    name = names[c] if c < len(names) else str(c)
    kinds = ", ".join(
        k for k, m in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)) if m(pixels[c]).any()
    )
    others = "" if int((bad > 0).sum()) == 1 else f" ({int((bad > 0).sum())} channels have some)"
    raise InputError(
        f"{where}: channel {name} has {int(bad[c]):,} non-finite pixels ({kinds}) of {pixels[c].size:,}{others}; "
        "scdino needs finite intensities. Replace them in the image (with 0 or the background level) and run again"
    )


def check_labels(labels: np.ndarray, where: str) -> None:
    """Refuse a label image with negative values (0 is background, nuclei are positive integers; an "ignore" mark
    would otherwise drop its cells without a word)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"{where}: labels of type {labels.dtype}; expected an integer label image (0 background, 1, 2, ... "
            "one per nucleus): convert it, or segment with --segment-channel instead of --labels"
        )
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and int(labels.min()) < 0:
        n = int((labels < 0).sum())
        raise InputError(
            f"{where}: {n:,} pixels hold negative labels (lowest {int(labels.min())}); expected 0 for background "
            "and positive integers for nuclei: set the negative values to 0 (background) and run again"
        )
