"""Class sets (names, palettes, ignore index, raw-label mapping): the one place that training, evaluation,
checkpoints, the Segmenter and the node take them from.

Convention everywhere in icnet_ros: class ids are 0..N-1 and **255 means ignore / unknown** (in training labels,
in metrics, and in the Segmenter's label output for pixels it does not classify).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = 255
#: the most classes a class set has (labels are 8-bit and 255 is ignore)
MAX_CLASSES = 255
MAX_NAME_LENGTH = 100


NAME_RULE = f"non-empty printable text of at most {MAX_NAME_LENGTH} characters"


def _is_name(v: Any) -> bool:
    """A class or class-set name: :data:`NAME_RULE`."""
    return isinstance(v, str) and bool(v.strip()) and len(v) <= MAX_NAME_LENGTH and v.isprintable()


def _integer(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _color_value(v: Any) -> bool:
    """A colour component: an integer in 0..255, or a float with an integer value (128.0, as a file written by code
    that built its palette in floats holds it)."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    return _integer(v) and 0 <= v <= 255


def is_color(c: Any) -> bool:
    """Whether ``c`` is an [R, G, B] colour as metadata carries it (a list or tuple of three components)."""
    return isinstance(c, (list, tuple)) and len(c) == 3 and all(_color_value(v) for v in c)


@dataclass(frozen=True)
class ClassSet:
    """A labelled class set. ``label_map`` maps raw label values in dataset files to train ids (others: ignore)."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    label_map: dict[int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _is_name(self.name):
            raise ValueError(f"bad class set (dataset) name {repr(self.name)[:80]} (need {NAME_RULE})")
        if len(self.classes) != len(self.palette):
            raise ValueError(f"class set {self.name!r}: {len(self.classes)} classes but {len(self.palette)} colors")
        if not 1 <= len(self.classes) <= MAX_CLASSES:
            raise ValueError(f"class set {self.name!r}: 1..{MAX_CLASSES} classes supported, got {len(self.classes)}")
        for c in self.classes:  # names reach subscribers (classes.names, the class metadata JSON) and reports
            if not _is_name(c):
                raise ValueError(f"class set {self.name!r}: bad class name {repr(c)[:80]} (need {NAME_RULE})")
        if len(set(self.classes)) != len(self.classes):
            twice = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise ValueError(f"class set {self.name!r}: class names must be distinct, repeated: {', '.join(twice)}")
        for c in self.palette:
            if len(c) != 3 or not all(_color_value(v) for v in c):
                raise ValueError(f"class set {self.name!r}: bad color {c!r}")
        # stored as ints (128.0 given in code is written to metadata as 128: the metadata check takes integers)
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))
        n = len(self.classes)
        if not _integer(self.ignore_index) or not n <= self.ignore_index <= 255:
            raise ValueError(f"class set {self.name!r}: ignore_index must be an integer in {n}..255 (not a class id), "
                             f"got {self.ignore_index!r}")
        for raw, train_id in (self.label_map or {}).items():
            if not (_integer(raw) and 0 <= raw <= 255) or not (
                    _integer(train_id) and (0 <= train_id < n or train_id == self.ignore_index)):
                raise ValueError(f"class set {self.name!r}: label_map {raw!r} -> {train_id!r} (raw values 0..255 "
                                 f"map to class ids 0..{n - 1} or the ignore index {self.ignore_index})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def palette_array(self) -> np.ndarray:
        """256 x 3 uint8 RGB lookup table; ids without a class (the ignore value included) are black."""
        lut = np.zeros((256, 3), np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, np.uint8)
        return lut

    def label_lut(self) -> np.ndarray:
        """256-entry uint8 table mapping raw label values to train ids (identity when no ``label_map``)."""
        if self.label_map is None:
            lut = np.full(256, self.ignore_index, np.uint8)
            lut[: self.num_classes] = np.arange(self.num_classes, dtype=np.uint8)
            return lut
        lut = np.full(256, self.ignore_index, np.uint8)
        for raw, train_id in self.label_map.items():
            lut[raw] = train_id
        return lut

    def to_meta(self) -> dict[str, Any]:
        return {"dataset": self.name, "classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index}


CAMVID = ClassSet(
    name="camvid",
    classes=("sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
             "bicyclist"),
    palette=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
             (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)),
    # raw 0..10 are classes, 11 is void
    label_map={i: i for i in range(11)},
)

CITYSCAPES = ClassSet(
    name="cityscapes",
    classes=("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
             "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
    palette=((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
             (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
             (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)),
    # gtFine *_labelIds.png label ids -> train ids
    label_map={7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
               27: 14, 28: 15, 31: 16, 32: 17, 33: 18},
)

CLASS_SETS: dict[str, ClassSet] = {c.name: c for c in (CAMVID, CITYSCAPES)}


def get_class_set(name: str) -> ClassSet:
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise ValueError(f"unknown class set {name!r}; known: {sorted(CLASS_SETS)}") from None


def generic_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct, deterministic colors for class sets that bring none (bit-interleaved, as in PASCAL VOC)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


def class_set_from_meta(meta: dict[str, Any]) -> ClassSet:
    """The class set stored in a checkpoint's metadata (``classes``, ``palette``, ``ignore_index``). Metadata comes
    from files: values of another type (a string for the class list, "255" or 12.7 or true for a colour value,
    Infinity) raise ValueError instead of being converted."""
    classes = meta["classes"]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a list of names, got {repr(classes)[:80]}")
    if not 1 <= len(classes) <= MAX_CLASSES:  # before a palette is made for them
        raise ValueError(f"1..{MAX_CLASSES} classes supported, got {len(classes)}")
    palette = meta.get("palette")
    if palette is None or (isinstance(palette, (list, tuple)) and not palette):
        palette = generic_palette(len(classes))
    elif not (isinstance(palette, (list, tuple)) and all(map(is_color, palette))):
        raise ValueError(f"palette must be a list of [R, G, B] integers in 0..255, got {repr(palette)[:80]}")
    ignore_index = meta.get("ignore_index", IGNORE_INDEX)
    if not _integer(ignore_index):
        raise ValueError(f"ignore_index must be an integer, got {repr(ignore_index)[:40]}")
    return ClassSet(name=meta.get("dataset", "custom"), classes=tuple(classes),
                    palette=tuple((int(r), int(g), int(b)) for r, g, b in palette), ignore_index=int(ignore_index))
