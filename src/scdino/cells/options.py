"""How cells are found and cropped: the one home of these defaults (the command-line options read them from here).

Light on purpose: no numpy, torch or zarr, so that ``--help`` can show the defaults without importing them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from scdino.bounds import Bound, bounded, check_fields, declare
from scdino.errors import ConfigError

#: crop side in pixels when neither ``crop_size`` nor ``crop_um`` is given
DEFAULT_CROP_SIZE = 64


@declare
@dataclass(frozen=True)
class SegmentParams:
    """Parameters of the built-in nucleus segmentation (all in pixels).

    sigma: gaussian smoothing before thresholding; threshold: ``"otsu"``, ``"li"`` or a number in raw units;
    min_distance: smallest distance between two nucleus centres when splitting touching nuclei (0 = no split);
    min_area / max_area: nuclei outside this range are dropped (max_area 0 = no upper bound).
    """

    sigma: float = bounded(2.0, Bound("gaussian smoothing in px; 0: none", low=0))
    threshold: str = "otsu"
    min_distance: int = bounded(7, Bound("least distance between nucleus centres in px; 0: no split", low=0,
                                         integer=True))  # fmt: skip
    min_area: int = bounded(30, Bound("smallest nucleus in px; 0: no lower bound", low=0, integer=True))
    max_area: int = bounded(0, Bound("largest nucleus in px; 0: no upper bound", low=0, integer=True))

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Each parameter in its bounds, the threshold a method or a number, and an area range that some nucleus can
        pass."""
        check_fields(self)
        if str(self.threshold) not in ("otsu", "li"):
            try:
                number = float(self.threshold)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise ConfigError(f"--threshold {self.threshold}: expected otsu, li or a number (raw intensity)")
        if 0 < self.max_area < self.min_area:
            raise ConfigError(
                f"--max-area {self.max_area} is below --min-area {self.min_area}: no nucleus can pass; raise "
                "--max-area (0: no upper bound) or lower --min-area"
            )


@declare
@dataclass(frozen=True)
class CellOptions:
    """How cells are found and cropped.

    channels: names or indices selecting and ordering the model's input channels (None = all);
    labels: name of a label image under ``labels/`` (None = segment); segment_channel: channel used for
    segmentation and for the intensity-weighted centroid (None = first selected channel); several channels
    (``"A,B"``) are combined as the pixel-wise maximum of each channel scaled by its 1st-99.8th percentile, which finds
    nuclei that are bright in any of them (e.g. mutually exclusive nuclear markers);
    crop_size: crop side in pixels (None = :data:`DEFAULT_CROP_SIZE`, or the stored size of a crop store);
    crop_um: crop side in micrometres (needs the pixel size in the plate);
    border: ``pad`` (zero-pad and flag cells whose window leaves the field) or ``skip``;
    wells: only these wells of a plate (None = all).
    """

    channels: tuple[str, ...] | None = None
    labels: str | None = None
    segment_channel: str | None = None
    crop_size: int | None = bounded(None, Bound("crop side in px", low=4, integer=True))
    crop_um: float | None = bounded(None, Bound("crop side in micrometres", low=0, low_open=True))
    border: str = "pad"
    segment: SegmentParams = field(default_factory=SegmentParams)
    wells: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The options among the fields ``names`` that are set here, as a command line spells them (``--wells``):
        a source lists the fields that do not apply to it, and says which of them were given."""
        return ["--" + n.replace("_", "-") for n in names if getattr(self, n)]
