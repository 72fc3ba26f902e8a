"""How cells are found and cropped: the one home of these defaults (the command-line options read them from here).

Light on purpose: no numpy, torch or zarr, so that ``--help`` can show the defaults without importing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: crop side in pixels when neither ``crop_size`` nor ``crop_um`` is given
DEFAULT_CROP_SIZE = 64


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of the built-in nucleus segmentation (all in pixels).

    sigma: gaussian smoothing before thresholding; threshold: ``"otsu"``, ``"li"`` or a number in raw units;
    min_distance: smallest distance between two nucleus centres when splitting touching nuclei (0 = no split);
    min_area / max_area: nuclei outside this range are dropped (max_area 0 = no upper bound).
    """

    sigma: float = 2.0
    threshold: str = "otsu"
    min_distance: int = 7
    min_area: int = 30
    max_area: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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
    crop_size: int | None = None
    crop_um: float | None = None
    border: str = "pad"
    segment: SegmentParams = field(default_factory=SegmentParams)
    wells: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The options among the fields ``names`` that are set here, as a command line spells them (``--wells``):
        a source lists the fields that do not apply to it, and says which of them were given."""
        return ["--" + n.replace("_", "-") for n in names if getattr(self, n)]
