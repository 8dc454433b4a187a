"""Segmentation datasets: the CamVid layout, the Cityscapes layout and generic image/label folders.

Layouts (``SPLIT`` is e.g. ``train``, ``val``; ``train+val`` concatenates splits):

- ``camvid``: ``ROOT/SPLIT/images/NAME.{jpg,png}`` and ``ROOT/SPLIT/labels/NAME.png`` holding CamVid ids 0..10
  (11 = void -> ignore); the class set is :data:`icnet_ros.classes.CAMVID`.
- ``cityscapes``: ``ROOT/leftImg8bit/SPLIT/CITY/X_leftImg8bit.png`` and ``ROOT/gtFine/SPLIT/CITY/X_gtFine_labelIds.png``
  (label ids mapped to the 19 train ids; ``X_gtFine_labelTrainIds.png`` is used as is when the label ids are absent).
- ``folders``: like ``camvid`` (directory patterns and label suffix configurable) with the classes from a *class
  file* (:func:`load_class_file`); labels hold raw class values, or RGB colours of the class palette.

Samples are returned as ``(image, label)``: an H x W x 3 uint8 RGB tensor and an H x W uint8 tensor of train ids
(255 = ignore). Normalisation happens later, on the training device (:class:`icnet_ros.preprocess.Normalizer`).

Image and label files larger than :data:`MAX_IMAGE_PIXELS` (50 megapixels; Cityscapes frames are 2) are refused
from their header, before any decoding: a small compressed file may claim a huge size. The files read are JPEG, PNG,
BMP, TIFF and WebP (:data:`HEADER_FORMATS`), whatever their suffix; other formats (Radiance HDR, PFM, ...), whose size
is not read from their header here, are refused as corrupt files are: a one-line :class:`DatasetError` naming the
file and the reason.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import reprlib
import signal
import string
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset, Sampler

from ..classes import CAMVID, CITYSCAPES, IGNORE_INDEX, ClassSet, generic_palette, get_class_set
from .transforms import Transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LAYOUTS = ("camvid", "cityscapes", "folders")
CLASS_FILE_NAMES = ("classes.yaml", "classes.yml", "classes.json", "classes.txt")
#: the most pixels (width x height) an image or label file may declare: larger files are refused from their header
#: before decoding (a few hundred KB of PNG can claim 16000 x 16000 pixels: gigabytes once decoded)
MAX_IMAGE_PIXELS = 50_000_000
#: the formats the readers decode, told by their bytes (a suffix may lie), each with its size checked from its header:
#: JPEG and PNG by the node's bounded header walk, the others by Pillow (with only their plugins, so that OpenCV then
#: decodes the bytes as the same format); files of other formats are refused
HEADER_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
_PILLOW_SIZED = ("BMP", "TIFF", "WEBP")


class DatasetError(ValueError):
    """A dataset that cannot be used: missing directories, unmatched files, bad labels or class files."""


# --------------------------------------------------------------------------------------------------- class files

def load_class_file(path: str | os.PathLike) -> ClassSet:
    """Read a class file: the classes of a generic dataset and how raw label values map to them.

    YAML / JSON (``.yaml``, ``.yml``, ``.json``)::

        name: my_dataset            # optional (default: the file's parent directory name)
        ignore_index: 255           # optional
        classes:                    # in train-id order
          - road                    # a bare name: raw label value = list position, colour generated
          - {name: car, color: [0, 0, 142], id: 26}   # id: the raw value in label files (default: position)

    Plain text (``.txt``): one class per line in train-id order, ``NAME`` or ``NAME R G B``; ``#`` starts a
    comment. The raw label value of a class is its line's position among the classes.

    Raw values that no class claims become ``ignore_index``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"class file not found: {p}")
    try:
        if p.suffix.lower() in (".yaml", ".yml", ".json"):
            entries, name, ignore = _parse_structured_class_file(p)
        else:
            entries, name, ignore = _parse_text_class_file(p), None, IGNORE_INDEX
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        raise DatasetError(f"{p}: invalid class file: {e}") from e
    if not entries:
        raise DatasetError(f"{p}: class file lists no classes")
    names = tuple(e["name"] for e in entries)
    if len(set(names)) != len(names):
        raise DatasetError(f"{p}: duplicate class names in {names}")
    fallback = generic_palette(len(entries))
    for i, e in enumerate(entries):
        where = f"{p}: class #{i} ({e['name']!r})"
        color, raw = e.get("color"), e.get("id")
        if color is not None and not (isinstance(color, (list, tuple)) and len(color) == 3
                                      and all(_is_int(v) and 0 <= v <= 255 for v in color)):
            raise DatasetError(f"{where}: bad color {_brief(color)} (need three integers [R, G, B] in 0..255)")
        if raw is not None and not _is_int(raw):
            raise DatasetError(f"{where}: id (the raw label value) must be an integer in 0..255, got {_brief(raw)}")
    explicit: dict[tuple[int, ...], str] = {}
    for e in entries:
        if e.get("color") is not None:
            color = tuple(int(v) for v in e["color"])
            if color in explicit:  # colour labels would merge the two classes, the color output show them as one
                raise DatasetError(f"{p}: classes {explicit[color]!r} and {e['name']!r} have the same color "
                                   f"{list(color)}: give each class its own")
            explicit[color] = e["name"]
    spare = iter(c for c in generic_palette(len(entries) + len(explicit))[len(entries):] if c not in explicit)
    palette_list: list[tuple[int, ...]] = []
    for i, e in enumerate(entries):  # a generated colour never repeats a colour given in the file
        if e.get("color") is not None:
            palette_list.append(tuple(int(v) for v in e["color"]))
        else:
            palette_list.append(fallback[i] if fallback[i] not in explicit else next(spare))
    palette = tuple(palette_list)
    raw_ids = [int(e["id"]) if e.get("id") is not None else i for i, e in enumerate(entries)]
    if len(set(raw_ids)) != len(raw_ids) or any(not 0 <= r <= 255 for r in raw_ids):
        raise DatasetError(f"{p}: raw label ids must be distinct values in 0..255, got {raw_ids}")
    if not 0 <= ignore <= 255:
        raise DatasetError(f"{p}: ignore_index must be in 0..255, got {ignore}")
    if ignore in raw_ids or ignore < len(entries):
        raise DatasetError(f"{p}: ignore_index {ignore} collides with a class")
    try:
        return ClassSet(name=name or p.resolve().parent.name or "custom", classes=names, palette=palette,
                        ignore_index=ignore, label_map={r: i for i, r in enumerate(raw_ids)})
    except ValueError as e:
        raise DatasetError(f"{p}: {e}") from e


#: how a value read from a class file is shown in an error: bounded (a few hundred bytes of YAML aliases make a
#: list nested nine levels deep with billions of elements, whose repr or str took minutes and gigabytes)
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 2, 4, 4, 4, 60, 60


def _brief(v: Any) -> str:
    return _BRIEF.repr(v)


def _is_int(v: Any) -> bool:
    """An integer (not a bool, not a float such as 3.7 that ``int`` would silently truncate)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_structured_class_file(p: Path) -> tuple[list[dict[str, Any]], str | None, int]:
    text = p.read_text(encoding="utf-8")
    doc = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    if isinstance(doc, list):
        doc = {"classes": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        raise ValueError("expected a mapping with a 'classes' list")
    unknown = set(doc) - {"name", "ignore_index", "classes", "palette"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (known: name, ignore_index, classes, palette)")
    palette = doc.get("palette")
    if palette is not None and not isinstance(palette, list):
        raise ValueError(f"palette must be a list of [R, G, B] colours, got {_brief(palette)}")
    if palette is not None and len(palette) != len(doc["classes"]):
        raise ValueError(f"{len(doc['classes'])} classes but {len(palette)} palette colours")
    entries = []
    for i, c in enumerate(doc["classes"]):
        if isinstance(c, str):
            c = {"name": c}
        if not isinstance(c, dict) or "name" not in c:
            raise ValueError(f"class #{i}: expected a name or a mapping with 'name', got {_brief(c)}")
        bad = set(c) - {"name", "color", "id"}
        if bad:
            raise ValueError(f"class #{i}: unknown keys {sorted(bad)} (known: name, color, id)")
        name = c["name"]
        if isinstance(name, bool) or not isinstance(name, (str, int, float)):  # (a number: `- {name: 2024}`)
            raise ValueError(f"class #{i}: the name must be text, got {_brief(name)}")
        entry = {"name": str(name), "color": c.get("color"), "id": c.get("id")}
        if entry["color"] is None and palette is not None:
            entry["color"] = palette[i]
        entries.append(entry)
    ignore = doc.get("ignore_index", IGNORE_INDEX)
    if not _is_int(ignore):
        raise ValueError(f"ignore_index must be an integer in 0..255, got {_brief(ignore)}")
    name = doc.get("name")
    if isinstance(name, (int, float)) and not isinstance(name, bool):  # `name: 2024` (YAML reads a number)
        name = str(name)
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be text, got {_brief(name)}")
    return entries, name, ignore


def _parse_text_class_file(p: Path) -> list[dict[str, Any]]:
    entries = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) >= 4 and all(t.lstrip("-").isdigit() for t in parts[-3:]):
            entries.append({"name": " ".join(parts[:-3]), "color": [int(t) for t in parts[-3:]]})
        else:
            entries.append({"name": " ".join(parts)})
    return entries


# --------------------------------------------------------------------------------------------------- file reading

def _check_pixel_limit(height: int, width: int, path: str | os.PathLike, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{what} {path}: declares {width}x{height} = {width * height / 1e6:.1f} megapixels, above "
                           f"the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels "
                           "(icnet_ros.data.datasets.MAX_IMAGE_PIXELS)")


def _read_encoded(path: Path, what: str) -> np.ndarray:
    """The bytes of an image or label file; a file larger than any image within :data:`MAX_IMAGE_PIXELS` can be is
    refused unread (the CLIs' reader)."""
    from ..video import ImageTooLargeError, SourceError, read_image_bytes

    try:
        return read_image_bytes(path, MAX_IMAGE_PIXELS)
    except ImageTooLargeError as e:
        raise DatasetError(f"{str(e).replace('image ', f'{what} ', 1)} (icnet_ros.data.datasets.MAX_IMAGE_PIXELS)") \
            from None
    except SourceError as e:
        raise DatasetError(str(e).replace("image ", f"{what} ", 1)) from None


def _check_header(data: np.ndarray, path: Path, what: str) -> None:
    """Refuse (:class:`DatasetError`) the encoded file ``data`` before it is decoded when its header declares more
    than :data:`MAX_IMAGE_PIXELS` pixels, or when its size cannot be read from its header. JPEG and PNG (by their
    signature) go through the node's bounded header walk (:func:`~icnet_ros.ros_image.compressed_header`: a PNG's
    chunks and their CRCs, a JPEG's scans counted); BMP, TIFF and WebP through Pillow's header parser. A format not
    in :data:`HEADER_FORMATS` is refused: OpenCV would decode it under only its own limit (2**30 pixels)."""
    from ..ros_image import ImageFormatError, compressed_header, sniff_codec

    if not data.size:
        raise DatasetError(f"cannot read {what} {path}: empty file")
    codec = sniff_codec(data)
    if codec:
        try:
            _, height, width = compressed_header(SimpleNamespace(format=codec, data=data))
        except ImageFormatError as e:
            raise DatasetError(f"cannot decode {what} {path}: {e}") from None
    else:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=_PILLOW_SIZED) as im:  # parses the header only
                    width, height = im.size
        except Image.DecompressionBombError as e:
            raise DatasetError(f"{what} {path}: declares too many pixels, above the limit of "
                               f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels (icnet_ros.data.datasets.MAX_IMAGE_PIXELS): "
                               f"{e}") from None
        except Exception:  # noqa: BLE001 - Pillow's plugins raise many kinds of error on junk
            raise DatasetError(f"cannot read {what} {path}: not a JPEG, PNG, BMP, TIFF or WebP file, or a corrupt "
                               "one (other formats are not read: their size is not checked before decoding)") \
                from None
    _check_pixel_limit(height, width, path, what)


def _decode(data: np.ndarray, flags: int, path: Path, what: str) -> np.ndarray:
    """:func:`icnet_ros.video.decode_image`, its failures a one-line :class:`DatasetError`."""
    from ..video import SourceError, decode_image

    try:
        return decode_image(data, flags, f"{what} {path}")
    except SourceError as e:
        raise DatasetError(str(e)) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an H x W x 3 uint8 RGB array (files above :data:`MAX_IMAGE_PIXELS`, and files whose size
    cannot be read from their header, are refused before decoding: :func:`_check_header`)."""
    path = Path(path)
    data = _read_encoded(path, "image")
    if jpeg_truncated(data):  # OpenCV decodes it, grey where the data ends, and says so only on stderr
        raise DatasetError(f"cannot read image {path}: truncated JPEG (no end-of-image marker after its last scan)")
    _check_header(data, path, "image")
    # the pixels as stored: an EXIF orientation tag is not applied (OpenCV would rotate JPEGs by it, while the PNG
    # labels, which carry none, stay as stored: a square frame silently misaligned with its label)
    return cv2.cvtColor(_decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, path, "image"),
                        cv2.COLOR_BGR2RGB)


def jpeg_truncated(data: np.ndarray | bytes) -> bool:
    """Whether ``data`` is a JPEG that ends before its end-of-image marker (FFD9 after the last start-of-scan FFDA;
    inside a scan FF is always followed by 00 or a restart marker, so neither appears there by chance)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if raw[:2] != b"\xff\xd8":
        return False
    sos = raw.rfind(b"\xff\xda")
    return sos < 0 or raw.find(b"\xff\xd9", sos) < 0


def _png_header(data: np.ndarray) -> tuple[int, int] | None:
    """A PNG's IHDR (bit depth, colour type: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA), None for other
    files."""
    head = data[:26].tobytes()
    return (head[24], head[25]) if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 26 else None


def read_label(path: str | os.PathLike, class_set: ClassSet, lut: np.ndarray | None = None) -> np.ndarray:
    """A label file as an H x W uint8 array of train ids (``class_set.ignore_index`` for unlabelled pixels).

    Single-channel labels hold raw values mapped through ``lut`` (default: ``class_set.label_lut()``); grey PNGs of
    bit depth 1, 2 or 4 are read as their stored values (0..1, 0..3, 0..15), not scaled to 0..255 as viewers show
    them; paletted PNGs are read as their palette indices, except colour labels saved with a palette of their own
    (:func:`_palette_is_colours`); 8-bit RGB labels are matched against the class palette (other colours: ignore),
    except class values saved as RGB (:func:`_grey_values_in_rgb`). Labels of more than 8 bits per colour channel,
    or single-channel values above 255, are refused. As for images, a file above :data:`MAX_IMAGE_PIXELS`, or
    whose size cannot be read from its header, is refused before decoding."""
    table = class_set.label_lut() if lut is None else lut
    values, ids = _read_label_values(Path(path), class_set, table)
    return table[values] if values is not None else ids


def _read_label_values(path: Path, class_set: ClassSet, table: np.ndarray) -> tuple[np.ndarray | None,
                                                                                      np.ndarray | None]:
    """:func:`read_label`'s reading: (raw uint8 values to map through ``table``, None), or (None, train ids) for a
    colour label."""
    data = _read_encoded(path, "label")
    _check_header(data, path, "label")
    bit_depth, colour_type = _png_header(data) or (None, None)
    if colour_type == 3:
        try:
            from PIL import Image
        except ImportError as e:
            raise DatasetError(f"{path} is a paletted PNG; reading its indices needs Pillow (pip install pillow)") \
                from e
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                raw = np.asarray(im)
                file_palette = im.getpalette() or []
        except Image.DecompressionBombError as e:
            raise DatasetError(f"label {path}: declares too many pixels: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot read label {path} (corrupt paletted PNG: {e})") from None
        colours = np.zeros((256, 3), np.uint8)  # index -> its colour (indices past the palette: black, as Pillow)
        pal = np.asarray(file_palette[:768], np.uint8).reshape(-1, 3)
        colours[:len(pal)] = pal
        if raw.ndim == 2 and raw.dtype == np.uint8 and _palette_is_colours(raw, colours, class_set):
            return None, colors_to_ids(colours[raw], class_set)
    else:
        raw = _decode(data, cv2.IMREAD_UNCHANGED, path, "label")
    if raw.ndim == 3 and colour_type == 4:  # grey + alpha (OpenCV gives 4 channels): the grey values are the label
        raw = raw[..., 0]
    elif raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]
    if raw.ndim == 3:
        if raw.dtype != np.uint8:  # the palette is 8-bit: every 16-bit colour would be unknown (ignore)
            raise DatasetError(f"label {path}: {8 * raw.itemsize}-bit colour label; colour labels must have 8 bits "
                               "per channel (or save the class values as a single-channel PNG)")
        rgb = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
        grey = _grey_values_in_rgb(rgb, class_set, table)
        return (grey, None) if grey is not None else (None, colors_to_ids(rgb, class_set))
    if colour_type == 0 and bit_depth in (1, 2, 4) and raw.dtype == np.uint8:
        # OpenCV (libpng) scales low-bit grey samples to 0..255 (value v -> v * 255 / (2**bits - 1)): a 1-bit mask's
        # foreground 1 became 255, the ignore index. The stored values are the class values, as in 8-bit files.
        # 4-bit too: its 16 values hold class values 0..15 (Pillow gives them scaled, x17; not taken here).
        step = 255 // (2 ** bit_depth - 1)
        if np.any(raw % step):
            raise DatasetError(f"cannot read label {path}: {bit_depth}-bit grey PNG decoded to values that are not "
                               f"multiples of {step}")
        raw = raw // step
    if raw.dtype != np.uint8:
        if raw.size and int(raw.max()) > 255:
            raise DatasetError(f"{path}: label values up to {int(raw.max())}; only 8-bit class values (0..255) "
                               "are supported")
        raw = raw.astype(np.uint8)
    return raw, None


@functools.cache
def _voc_palette() -> np.ndarray:
    """PASCAL VOC's 256 x 3 palette (index 0 black; the generated class palettes are its colours from index 1),
    made once (per label file it cost a 2,000-step Python loop)."""
    return np.array(((0, 0, 0), *generic_palette(255)), np.int64)


def _palette_is_colours(indices: np.ndarray, colours: np.ndarray, class_set: ClassSet) -> bool:
    """Whether a paletted label is a colour label saved with a palette of its own (a quantiser's, or an editor's
    indexed export: CamVid's colours at indices in the order the file met them) rather than class values with a
    palette for viewing. So when every index in use shows a class colour or black (the void of colour labels),
    some index shows another class's colour than its own, and the palette is not one that labels of class values
    use: PASCAL VOC's (index 0 black, then VOC's colours: generated class palettes are VOC's from index 1, so a
    VOC label's index 2 shows class 1's colour) or a grey ramp (index v shows (v, v, v)). Read as indices, a
    colour label saved so gave most pixels the wrong class (index 0, the pole colour, read as sky)."""
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    shown = colours[used].astype(np.int64)
    if (shown == _voc_palette()[used]).all() or (shown == used[:, None]).all():
        return False
    class_colours = {tuple(c): i for i, c in enumerate(class_set.palette)}
    owner = [class_colours.get(tuple(int(v) for v in colours[u]), None) for u in used]
    if any(o is None and colours[u].any() for u, o in zip(used, owner)):
        return False  # a colour of no class: not a colour label of this class set
    return any(o is not None and o != u for u, o in zip(used, owner))


def _grey_values_in_rgb(rgb: np.ndarray, class_set: ClassSet, table: np.ndarray) -> np.ndarray | None:
    """The class values of an RGB label whose three channels are equal at every pixel when it holds class values
    saved as RGB (what PIL's ``convert("RGB")`` and many image editors write; read as colours every pixel was
    ignore), else None (a colour label: :func:`colors_to_ids`).

    Read as class values only when it cannot be a colour label:

    - no pixel has a colour of the class palette (one that does is a colour label: CamVid's sky is
      (128, 128, 128));
    - every value is a class's raw value (``table``), the ignore index, or the value after the largest class value
      (a void class numbered after the classes: CamVid's 11);
    - some value is neither 0 nor the ignore index: dark greys such as (3, 3, 3) are no colour scheme's class
      colour, while black and white are the void / background colours of colour labels (CamVid's void is black).

    A label holding only 0 (and the ignore value) is either a frame of class 0 saved as RGB or a colour label of
    void only (a CamVid frame with nothing labelled): it is read as a colour label, as before this rule (nothing
    labelled; a training run warns when a whole logged window has no labelled pixel), not refused: refused, one
    such frame stopped a training run."""
    r = rgb[..., 0]
    if not (np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2])):
        return None
    values = set(np.flatnonzero(np.bincount(r.ravel(), minlength=256)).tolist())
    ignore = class_set.ignore_index
    if values & {c[0] for c in class_set.palette if c[0] == c[1] == c[2]}:
        return None
    classes = np.flatnonzero(table != ignore)
    if not values <= set(classes.tolist()) | {ignore, int(classes.max()) + 1 if classes.size else 0}:
        return None
    return r if values - {0, ignore} else None


def colors_to_ids(rgb: np.ndarray, class_set: ClassSet) -> np.ndarray:
    """Map an H x W x 3 RGB colour label to train ids via the class palette; unknown colours -> ignore. Raises
    :class:`DatasetError` for a palette that gives two classes one colour (a model's metadata may: class files
    refuse it), which a colour label cannot tell apart."""
    pal = np.asarray(class_set.palette, np.int32)
    pal_keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    if len(np.unique(pal_keys)) < len(pal_keys):
        same = [c for i, c in enumerate(class_set.classes) if (pal_keys == pal_keys[i]).sum() > 1]
        raise DatasetError(f"colour labels cannot be read with the classes of {class_set.name!r}: "
                           f"{', '.join(same)} share a colour (give the dataset a class file)")
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    order = np.argsort(pal_keys)
    sorted_keys = pal_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    hit = sorted_keys[pos] == keys
    out = np.full(keys.shape, class_set.ignore_index, np.uint8)
    out[hit] = order[pos[hit]].astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DataSpec:
    """Where a dataset lives and how to read it (the ``data`` section of a training config)."""

    root: str
    layout: str = "auto"  # auto | camvid | cityscapes | folders
    class_set: str | None = None  # a named class set (icnet_ros.classes); default: the layout's
    class_file: str | None = None  # generic folders: the class file (default: ROOT/classes.{yaml,yml,json,txt})
    image_dir: str = "{split}/images"  # camvid / folders layouts
    label_dir: str = "{split}/labels"
    label_suffix: str = ""  # label file = image stem + suffix + ".png"

    def __post_init__(self) -> None:
        # ``~`` expanded once, for every reader of the spec: a shell leaves ``data.root=~/x`` as it is, and a YAML
        # ``root: ~/x`` is never expanded; only the file search expanded it, so the class set was chosen for a
        # missing folder (CamVid's, for a Cityscapes or class-file dataset: trained on wrong classes, exit 0)
        object.__setattr__(self, "root", os.path.expanduser(os.fspath(self.root)))
        if self.class_file is not None:
            object.__setattr__(self, "class_file", os.path.expanduser(os.fspath(self.class_file)))


def detect_layout(root: str | os.PathLike) -> str:
    """``cityscapes`` when ROOT has leftImg8bit/ and gtFine/, ``folders`` when it has a class file, else
    ``camvid``."""
    r = Path(root)
    if (r / "leftImg8bit").is_dir() and (r / "gtFine").is_dir():
        return "cityscapes"
    if any((r / n).is_file() for n in CLASS_FILE_NAMES):
        return "folders"
    return "camvid"


def resolve_class_set(spec: DataSpec, layout: str | None = None) -> ClassSet:
    """The class set of the dataset ``spec`` describes."""
    layout = layout or (detect_layout(spec.root) if spec.layout == "auto" else spec.layout)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    if spec.class_file:
        return load_class_file(spec.class_file)
    if spec.class_set:
        try:
            return get_class_set(spec.class_set)
        except ValueError as e:
            raise DatasetError(str(e)) from None
    if layout == "cityscapes":
        return CITYSCAPES
    if layout == "camvid":
        return CAMVID
    for n in CLASS_FILE_NAMES:
        if (Path(spec.root) / n).is_file():
            return load_class_file(Path(spec.root) / n)
    raise DatasetError(f"layout 'folders' needs a class file: set data.class_file (or --class-file), or put one "
                       f"of {', '.join(CLASS_FILE_NAMES)} in {spec.root}")


def split_names(split: str) -> list[str]:
    """``"train+val"`` -> ``["train", "val"]``."""
    names = [s.strip() for s in split.split("+") if s.strip()]
    if not names:
        raise DatasetError(f"empty split name {split!r}")
    return names


def find_samples(spec: DataSpec, split: str) -> tuple[list[tuple[Path, Path]], str, np.ndarray | None]:
    """The sorted (image, label) pairs of ``split`` (``a+b`` concatenates), the layout used, and the raw-label
    lookup table when it differs from the class set's (Cityscapes train-id labels)."""
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root} (relative paths are taken from {Path.cwd()})")
    layout = detect_layout(root) if spec.layout == "auto" else spec.layout
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    samples: list[tuple[Path, Path]] = []
    lut = None
    kinds: dict[str, list[str]] = {}  # Cityscapes: label kind -> splits (one lookup table serves all samples)
    for s in split_names(split):
        if layout == "cityscapes":
            pairs, train_ids = _cityscapes_pairs(root, s)
            kinds.setdefault("*_labelTrainIds.png" if train_ids else "*_labelIds.png", []).append(s)
            if len(kinds) > 1:
                raise DatasetError(f"{root / 'gtFine'}: split(s) {', '.join(map(repr, kinds['*_labelTrainIds.png']))} "
                                   f"have only *_labelTrainIds.png and split(s) "
                                   f"{', '.join(map(repr, kinds['*_labelIds.png']))} *_labelIds.png; use one kind "
                                   f"in every split of {split!r}")
            if train_ids:
                lut = _identity_lut(len(CITYSCAPES.classes))
        else:
            pairs = _folder_pairs(root, s, spec)
        samples += pairs
    return samples, layout, lut


def _identity_lut(n: int) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[:n] = np.arange(n, dtype=np.uint8)
    return lut


def _split_dir(pattern: str, split: str, key: str) -> str:
    """Directory ``pattern`` (``data.image_dir`` / ``data.label_dir``) with ``{split}`` filled in; any other field
    (a typo such as ``{splt}``, or ``{}``) is a :class:`DatasetError`."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        if any(f != "split" for f in fields):
            raise ValueError(f"field(s) {', '.join('{' + f + '}' for f in fields if f != 'split')}")
        return pattern.format(split=split)
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise DatasetError(f"data.{key} {pattern!r}: bad directory pattern ({e}); the only field allowed is "
                           "{split} (write {{ and }} for literal braces)") from None


def _folder_pairs(root: Path, split: str, spec: DataSpec) -> list[tuple[Path, Path]]:
    img_dir = root / _split_dir(spec.image_dir, split, "image_dir")
    lbl_dir = root / _split_dir(spec.label_dir, split, "label_dir")
    for d, what in ((img_dir, "image"), (lbl_dir, "label")):
        if not d.is_dir():
            raise DatasetError(f"{what} directory not found: {d} (expected layout ROOT/{spec.image_dir} + "
                               f"ROOT/{spec.label_dir} with split {split!r})")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}")
    stems: dict[str, Path] = {}
    for im in images:  # x.jpg and x.png would both take x's label: the frame counted twice
        if im.stem in stems:
            raise DatasetError(f"{img_dir}: {stems[im.stem].name} and {im.name} are one frame under two names (both "
                               f"take the label {im.stem}{spec.label_suffix}.png); keep one")
        stems[im.stem] = im
    pairs, missing = [], []
    for im in images:
        lbl = lbl_dir / f"{im.stem}{spec.label_suffix}.png"
        (pairs.append((im, lbl)) if lbl.is_file() else missing.append(lbl.name))
    if missing:
        raise DatasetError(f"{len(missing)} of {len(images)} images in {img_dir} have no label in {lbl_dir} "
                           f"(e.g. {', '.join(missing[:3])})")
    return pairs


def _cityscapes_pairs(root: Path, split: str) -> tuple[list[tuple[Path, Path]], bool]:
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_dir.is_dir() or not gt_dir.is_dir():
        raise DatasetError(f"Cityscapes split {split!r} not found: need {img_dir} and {gt_dir}")
    images = sorted(p for p in img_dir.glob("*/*_leftImg8bit.png") if p.is_file())  # (a FIFO: read, it blocks)
    if not images:
        raise DatasetError(f"no */*_leftImg8bit.png images in {img_dir}")
    pairs, train_ids, missing = [], False, []
    for im in images:
        stem = im.name[: -len("_leftImg8bit.png")]
        ids = gt_dir / im.parent.name / f"{stem}_gtFine_labelIds.png"
        tids = gt_dir / im.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if ids.is_file():
            pairs.append((im, ids))
        elif tids.is_file():
            pairs.append((im, tids))
            train_ids = True
        else:
            missing.append(ids.name)
    if missing:
        raise DatasetError(f"{len(missing)} Cityscapes images in {img_dir} have no gtFine label "
                           f"(e.g. {', '.join(missing[:3])})")
    if train_ids and any(lbl.name.endswith("_labelIds.png") for _, lbl in pairs):
        raise DatasetError(f"{gt_dir}: some images have only *_labelTrainIds.png and others *_labelIds.png; "
                           "use one kind")
    return pairs, train_ids


class SegmentationDataset(Dataset):
    """Image/label pairs with an optional augmentation pipeline.

    ``dataset[(i, seed)]`` (what the training sampler yields) runs ``transform`` with
    ``numpy.random.default_rng(seed)``, so augmentation depends only on the sampler's seeds. ``dataset[i]`` is
    ``dataset[(i, i)]`` (``i`` taken modulo the length: ``dataset[-1]`` is the last sample's): the same sample every
    time, its augmentation (if ``transform`` has random steps) fixed by the index, never drawn from fresh entropy."""

    def __init__(self, samples: Sequence[tuple[Path, Path]], class_set: ClassSet, transform: Transform | None = None,
                 label_lut: np.ndarray | None = None, name: str = "dataset") -> None:
        if not samples:
            raise DatasetError(f"{name}: no samples")
        self.samples = [(Path(a), Path(b)) for a, b in samples]
        self.class_set = class_set
        self.transform = transform
        self.label_lut = class_set.label_lut() if label_lut is None else label_lut
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (image, train-id label) arrays of sample ``index``, checked for matching sizes."""
        img_path, lbl_path = self.samples[index]
        image = read_image(img_path)
        label = read_label(lbl_path, self.class_set, self.label_lut)
        if image.shape[:2] != label.shape[:2]:
            raise DatasetError(f"{img_path.name}: image is {image.shape[1]}x{image.shape[0]} but its label "
                               f"{lbl_path} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def unclaimed_values_warning(self, max_files: int = 16) -> str | None:
        """A one-line warning when label files hold values that no class claims (None when none does), from up to
        ``max_files`` label files spread over the dataset (read once, at start). Such values are read as ignore,
        so a dataset exported with a wrong value (road saved as 40), or with more classes than the class set (a
        20-class dataset in the CamVid layout without a class file), trained and evaluated without a word, the
        class missing from the results. Values up to the largest claimed one plus one (the gaps of Cityscapes'
        label ids, a void value after the classes as CamVid's 11) and the ignore index are not reported: datasets
        use them for void. Colour labels are not checked (any colour of no class is void in them)."""
        table = self.label_lut
        claimed = np.flatnonzero(table != self.class_set.ignore_index)
        void_up_to = int(claimed.max()) + 1 if claimed.size else 0
        picks = sorted({round(i) for i in np.linspace(0, len(self.samples) - 1, min(max_files, len(self.samples)))})
        counts = np.zeros(256, np.int64)
        total, files, example = 0, 0, None
        for i in picks:
            path = self.samples[i][1]
            values, _ = _read_label_values(path, self.class_set, table)
            if values is None:
                continue
            hist = np.bincount(values.ravel(), minlength=256)
            hist[: void_up_to + 1] = 0  # the claimed values and the void ones up to one past them
            hist[self.class_set.ignore_index] = 0
            if hist.any():
                total += values.size
                counts += hist
                files += 1
                example = example or path
        if not files:
            return None
        found = np.flatnonzero(counts)
        shown = ", ".join(str(v) for v in found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        return (f"label values {shown} belong to no class of {self.class_set.name!r} (its classes take "
                f"{_ranges(claimed)}; {self.class_set.ignore_index} is ignore): {files} of the {len(picks)} label "
                f"files checked hold them (e.g. {example}; {counts.sum() / total:.1%} of their pixels), and "
                "they are read as unlabelled (ignored); check the label files, or give the dataset a class file "
                "that names every value")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.load(index)
        if seed is None:  # (after load: an index out of range is its IndexError)
            seed = index % len(self.samples)
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng(seed))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))


def _ranges(values: np.ndarray) -> str:
    """Sorted integers as ranges: ``0..10``, ``7, 8, 11..13``."""
    out: list[str] = []
    for v in (int(x) for x in values):
        if out and out[-1].split("..")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('..')[0]}..{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def build_dataset(spec: DataSpec, split: str, transform: Transform | None = None, limit: int | None = None,
                  class_set: ClassSet | None = None) -> SegmentationDataset:
    """The dataset of ``split`` (``a+b`` concatenates splits); ``limit`` keeps the first N samples (sorted)."""
    samples, layout, lut = find_samples(spec, split)
    if class_set is None:
        class_set = resolve_class_set(spec, layout)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be >= 1, got {limit}")
        samples = samples[:limit]
    return SegmentationDataset(samples, class_set, transform, label_lut=lut, name=f"{spec.root}:{split}")


def collate_segmentation(batch: list[tuple[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
    """Stack (image, label) pairs into N x H x W x 3 and N x H x W tensors; when sizes differ, return lists."""
    images, labels = [b[0] for b in batch], [b[1] for b in batch]
    if all(i.shape == images[0].shape for i in images) and all(lb.shape == labels[0].shape for lb in labels):
        return torch.stack(images), torch.stack(labels)
    return images, labels


def worker_init(_worker_id: int) -> None:
    """DataLoader worker setup: no OpenCV thread pool per worker (the workers are the parallelism); Ctrl-C is the
    main process's to handle (a terminal sends it to the workers too: one that died of it would end the run before
    the main process saved its state). SIGTERM keeps its default: the DataLoader ends a worker that does not stop
    in time with it (one that ignored it hung the process's exit); a SIGTERM sent to the whole process group
    (``timeout``, Slurm, systemd) ends the workers, and the trainer's stop handling expects that."""
    cv2.setNumThreads(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def one_line_error(error: BaseException) -> str:
    """The error's own message: an error raised in a DataLoader worker reaches the main process wrapped in the
    worker's traceback ("Caught DatasetError in DataLoader worker process 1. Original Traceback ..."); its last
    line holds the message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last


# --------------------------------------------------------------------------------------------------- samplers

class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless, resumable, rank-sharded batches of ``(index, augmentation_seed)`` for iteration-based training.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; it is tiled when the dataset is smaller than one global
    batch, split across ``world_size`` ranks, and cut into full batches (a partial last batch is dropped). The
    augmentation seed of every sample is drawn from ``(seed, e, position)``. Starting at batch ``start`` replays
    exactly the batches an uninterrupted run would have seen from that point.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        if dataset_len < 1 or batch_size < 1:
            raise ValueError(f"need dataset_len >= 1 and batch_size >= 1, got {dataset_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in 0..{world_size - 1}")
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        global_batch = batch_size * world_size
        self.per_epoch_total = max(dataset_len, global_batch)
        self.batches_per_epoch = self.per_epoch_total // global_batch

    def epoch(self, e: int) -> list[list[tuple[int, int]]]:
        """The batches of this rank in epoch ``e``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        reps = math.ceil(self.per_epoch_total / self.n)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[: self.per_epoch_total]
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=g)
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        mine = list(range(self.rank, usable, self.world_size))
        return [[(int(order[j]), int(seeds[j])) for j in mine[b * self.batch_size:(b + 1) * self.batch_size]]
                for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        e, b = divmod(self.start, self.batches_per_epoch)
        while True:
            batches = self.epoch(e)
            yield from batches[b:]
            e, b = e + 1, 0


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding (evaluation: each sample counted
    once across ranks)."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


__all__ = ["CLASS_FILE_NAMES", "DataSpec", "DatasetError", "HEADER_FORMATS", "IMAGE_EXTENSIONS", "LAYOUTS",
           "MAX_IMAGE_PIXELS", "SegmentationDataset", "ShardSampler", "TrainBatchSampler", "build_dataset",
           "collate_segmentation", "colors_to_ids",
           "detect_layout", "find_samples", "load_class_file", "read_image", "read_label", "resolve_class_set",
           "split_names", "worker_init"]
