"""Datasets (CamVid, Cityscapes and generic layouts, class files, label formats), augmentations and samplers."""
import cv2
import numpy as np
import pytest
import torch

from helpers import CAMVID, require
from icnet_ros.classes import CAMVID as CAMVID_CLASSES
from icnet_ros.classes import CITYSCAPES, IGNORE_INDEX
from icnet_ros.data import (DataSpec, DatasetError, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomResize,
                            TrainBatchSampler, build_dataset, collate_segmentation, detect_layout, find_samples,
                            load_class_file, read_label, resolve_class_set, train_transforms)
from icnet_ros.data.datasets import colors_to_ids


# ------------------------------------------------------------------------------------------------ CamVid layout

def test_camvid_layout_reads_rgb_images_and_maps_void_to_ignore():
    root = require(CAMVID)
    ds = build_dataset(DataSpec(str(root)), "val", limit=3)
    assert len(ds) == 3 and ds.class_set is CAMVID_CLASSES
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (360, 480, 3)
    assert label.dtype == torch.uint8 and label.shape == (360, 480)
    img_path, lbl_path = ds.samples[0]
    bgr = cv2.imread(str(img_path))
    assert torch.equal(image, torch.from_numpy(bgr[..., ::-1].copy()))  # RGB order
    raw = cv2.imread(str(lbl_path), cv2.IMREAD_UNCHANGED)
    assert (raw == 11).any(), "fixture frame should contain void pixels"
    lab = label.numpy()
    assert (lab[raw == 11] == IGNORE_INDEX).all()
    assert (lab[raw < 11] == raw[raw < 11]).all()
    assert set(np.unique(lab)) <= set(range(11)) | {IGNORE_INDEX}


def test_camvid_split_concatenation_and_errors(tmp_path):
    root = require(CAMVID)
    spec = DataSpec(str(root))
    train, _, _ = find_samples(spec, "train")
    val, _, _ = find_samples(spec, "val")
    both, layout, _ = find_samples(spec, "train+val")
    assert layout == "camvid" and both == train + val and len(train) == 367 and len(val) == 101
    with pytest.raises(DatasetError, match="image directory not found: .*nosuch"):
        find_samples(spec, "nosuch")
    with pytest.raises(DatasetError, match="dataset root not found"):
        find_samples(DataSpec(str(tmp_path / "missing")), "val")


def test_missing_label_and_size_mismatch_are_reported(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "labels").mkdir()
    img = np.zeros((64, 80, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "val" / "images" / "a.png"), img)
    cv2.imwrite(str(tmp_path / "val" / "images" / "b.jpg"), img)
    cv2.imwrite(str(tmp_path / "val" / "labels" / "a.png"), np.zeros((32, 80), np.uint8))
    spec = DataSpec(str(tmp_path), layout="camvid")
    with pytest.raises(DatasetError, match=r"1 of 2 images .* have no label .*b\.png"):
        build_dataset(spec, "val")
    (tmp_path / "val" / "images" / "b.jpg").unlink()
    ds = build_dataset(spec, "val")
    with pytest.raises(DatasetError, match="a.png: image is 80x64 but its label .* is 80x32"):
        ds[0]


# ------------------------------------------------------------------------------------------------ Cityscapes layout

def _cityscapes_tree(root, split="val"):
    img_dir = root / "leftImg8bit" / split / "aachen"
    gt_dir = root / "gtFine" / split / "aachen"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = np.zeros((64, 96), np.uint8)  # 0 = unlabeled -> ignore
    ids[:, 32:64] = 7  # road -> 0
    ids[:, 64:] = 26  # car -> 13
    ids[:8, :8] = 33  # bicycle -> 18
    for name in ("aachen_000000_000019", "aachen_000001_000019"):
        cv2.imwrite(str(img_dir / f"{name}_leftImg8bit.png"), rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
        cv2.imwrite(str(gt_dir / f"{name}_gtFine_labelIds.png"), ids)
        cv2.imwrite(str(gt_dir / f"{name}_gtFine_color.png"), np.zeros((64, 96, 3), np.uint8))
    return ids


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    ids = _cityscapes_tree(tmp_path)
    assert detect_layout(tmp_path) == "cityscapes"
    ds = build_dataset(DataSpec(str(tmp_path)), "val")
    assert len(ds) == 2 and ds.class_set is CITYSCAPES
    _, label = ds[1]
    lab = label.numpy()
    assert (lab[ids == 0] == IGNORE_INDEX).all()
    assert (lab[ids == 7] == 0).all() and (lab[ids == 26] == 13).all() and (lab[ids == 33] == 18).all()
    with pytest.raises(DatasetError, match="Cityscapes split 'train' not found"):
        build_dataset(DataSpec(str(tmp_path)), "train")


def test_fifos_named_like_images_never_block(tmp_path):
    """A FIFO named like a Cityscapes image (the layout listed every */*_leftImg8bit.png, files or not) blocked the
    image reader's open() for good: icnet-eval and icnet-train hung in a DataLoader worker. Now the layout lists
    files only, and the reader refuses anything but a regular file (a FIFO, a device) without blocking."""
    import os
    import time

    from icnet_ros.video import SourceError, read_image_bytes

    _cityscapes_tree(tmp_path)
    fifo = tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_000002_000019_leftImg8bit.png"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert len(build_dataset(DataSpec(str(tmp_path)), "val")) == 2
    for path in (fifo, "/dev/zero"):
        with pytest.raises(SourceError, match=f"^cannot read image {path}: not a regular file$"):
            read_image_bytes(path)
    assert time.monotonic() - t0 < 10


def test_cityscapes_splits_with_different_label_kinds_are_not_concatenated(tmp_path):
    """train+val with *_labelIds in one split and only *_labelTrainIds in the other: one lookup table cannot read
    both (label id 7 = road would be read as train id 7 = traffic sign); refused as within one split."""
    _cityscapes_tree(tmp_path, "train")
    img_dir, gt_dir = tmp_path / "leftImg8bit" / "val" / "bonn", tmp_path / "gtFine" / "val" / "bonn"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    cv2.imwrite(str(img_dir / "bonn_0_leftImg8bit.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(gt_dir / "bonn_0_gtFine_labelTrainIds.png"), np.zeros((64, 64), np.uint8))
    for split in ("train", "val"):  # each split alone reads its own kind
        assert len(build_dataset(DataSpec(str(tmp_path)), split)) >= 1
    for split in ("train+val", "val+train"):
        with pytest.raises(DatasetError, match=r"'val' have only \*_labelTrainIds.png and split\(s\) 'train' "
                                               r"\*_labelIds.png; use one kind"):
            build_dataset(DataSpec(str(tmp_path)), split)


def test_cityscapes_train_id_labels_are_used_as_is(tmp_path):
    img_dir, gt_dir = tmp_path / "leftImg8bit" / "val" / "bonn", tmp_path / "gtFine" / "val" / "bonn"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    cv2.imwrite(str(img_dir / "bonn_0_leftImg8bit.png"), np.zeros((64, 64, 3), np.uint8))
    tids = np.full((64, 64), 255, np.uint8)
    tids[:32] = 5
    tids[32:, :10] = 18
    cv2.imwrite(str(gt_dir / "bonn_0_gtFine_labelTrainIds.png"), tids)
    _, label = build_dataset(DataSpec(str(tmp_path)), "val")[0]
    assert np.array_equal(label.numpy(), tids)


# ------------------------------------------------------------------------------------------------ generic folders

def test_yaml_class_file_with_raw_ids_and_colors(tmp_path):
    (tmp_path / "classes.yaml").write_text(
        "name: yard\nignore_index: 255\nclasses:\n"
        "  - {name: grass, color: [0, 200, 0], id: 10}\n"
        "  - {name: path, id: 20}\n"
        "  - wall\n")
    cs = load_class_file(tmp_path / "classes.yaml")
    assert cs.name == "yard" and cs.classes == ("grass", "path", "wall") and cs.palette[0] == (0, 200, 0)
    lut = cs.label_lut()
    assert lut[10] == 0 and lut[20] == 1 and lut[2] == 2 and lut[0] == 255 and lut[1] == 255
    (tmp_path / "year.yaml").write_text("name: 2024\nclasses: [a, b]\n")  # YAML reads the name as a number
    assert load_class_file(tmp_path / "year.yaml").name == "2024"


def test_text_class_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# name [r g b]\nbackground 0 0 0\n\nroad sign 220 220 0  # two-word name\nperson\n")
    cs = load_class_file(f)
    assert cs.classes == ("background", "road sign", "person")
    assert cs.palette[:2] == ((0, 0, 0), (220, 220, 0)) and len(cs.palette[2]) == 3
    assert cs.name == tmp_path.name


@pytest.mark.parametrize("text, message", [
    ("classes: [a, a]\n", "duplicate class names"),
    ("classes: []\n", "lists no classes"),
    ("classes: [{name: a, colour: [1, 2, 3]}]\n", "unknown keys"),
    ("classes: [{name: a, id: 300}]\n", "raw label ids"),
    ("classes: [{name: a, color: [1, 2]}]\n", "bad color"),
    ("classes: [a, b]\nignore_index: 1\n", "collides"),
    ("[unclosed\n", "invalid class file"),
    ("classes:\n  - road\n  - {name: car, id: abc}\n", r"class #1 \('car'\): id .* must be an integer .*'abc'"),
    ("classes:\n  - road\n  - {name: car, id: 3.7}\n", r"class #1 \('car'\): id .* must be an integer .*3\.7"),
    ("classes:\n  - {name: road, color: red}\n  - car\n", r"class #0 \('road'\): bad color 'red'"),
    ("classes:\n  - {name: road, color: [1, 2, null]}\n", r"class #0 \('road'\): bad color \[1, 2, None\]"),
    ("palette: [[1, 2, 3]]\nclasses: [road, car]\n", "2 classes but 1 palette colours"),
    ("classes: [a]\nignore_index: 254.5\n", "ignore_index must be an integer"),
    ("classes:\n  - {name: car, color: [0, 0, 142]}\n  - {name: truck, color: [0, 0, 142]}\n",
     r"classes 'car' and 'truck' have the same color \[0, 0, 142\]"),
])
def test_bad_class_files(tmp_path, text, message):
    f = tmp_path / "classes.yaml"
    f.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        load_class_file(f)
    assert str(f) in str(info.value)  # names the file
    with pytest.raises(DatasetError, match="class file not found"):
        load_class_file(tmp_path / "nope.yaml")


def _folders(root, label_writer, classes_yaml, sizes=((48, 64), (48, 64))):
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "classes.yaml").write_text(classes_yaml)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(root / "train" / "images" / f"f{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        label_writer(root / "train" / "labels" / f"f{i}_mask.png", h, w)


def test_generic_folders_with_rgb_color_labels(tmp_path):
    def write(path, h, w):
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:, : w // 2] = (10, 20, 30)  # class 0
        rgb[:, w // 2:] = (200, 100, 0)  # class 1
        rgb[0, 0] = (1, 2, 3)  # unknown colour -> ignore
        cv2.imwrite(str(path), rgb[..., ::-1])

    _folders(tmp_path, write, "classes:\n  - {name: a, color: [10, 20, 30]}\n  - {name: b, color: [200, 100, 0]}\n")
    assert detect_layout(tmp_path) == "folders"
    spec = DataSpec(str(tmp_path), label_suffix="_mask")
    assert resolve_class_set(spec).classes == ("a", "b")
    _, label = build_dataset(spec, "train")[0]
    lab = label.numpy()
    assert lab[0, 0] == 255 and (lab[1:, :32] == 0).all() and (lab[:, 32:] == 1).all()


def test_paletted_png_labels_are_read_as_indices(tmp_path):
    from PIL import Image

    def write(path, h, w):
        idx = np.zeros((h, w), np.uint8)
        idx[h // 2:] = 2
        idx[:4, :4] = 255
        im = Image.fromarray(idx, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
        im.save(path)

    _folders(tmp_path, write, "classes: [bg, x, y]\n")
    ds = build_dataset(DataSpec(str(tmp_path), label_suffix="_mask"), "train")
    lab = read_label(ds.samples[0][1], ds.class_set)
    assert lab[0, 0] == 255 and lab[10, 10] == 0 and (lab[24:] == 2).all()


def test_colour_labels_saved_with_a_palette_of_their_own_are_read_by_colour(tmp_path):
    """A colour label saved as a paletted PNG by a quantiser or an editor's indexed export holds CamVid's colours
    at indices in the order the file met them; read as indices, most pixels took another class (index 0 showed
    the pole colour and was read as sky). Labels of class values with PASCAL VOC's palette (whose index 2 shows the
    colour the generated palettes give class 1) or a grey ramp stay indices."""
    from PIL import Image

    ids = np.full((48, 64), IGNORE_INDEX, np.uint8)
    for k, c in enumerate((2, 5, 3, 8, 0)):  # pole, tree, road, car, sky in bands; a void band at the bottom
        ids[8 * k:8 * (k + 1)] = c
    rgb = CAMVID_CLASSES.palette_array()[ids]  # void black
    path = tmp_path / "colour.png"
    quantised = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    quantised.save(path)
    stored = np.asarray(Image.open(path))
    assert not np.array_equal(stored, np.where(ids == IGNORE_INDEX, stored, ids))  # indices are not the classes
    assert np.array_equal(read_label(path, CAMVID_CLASSES), ids)

    generic = load_class_file(_write(tmp_path / "classes.txt", "bg\nperson\ncar\n"))  # generated palette
    voc = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 252
    grey = [v for i in range(256) for v in (i, i, i)]
    for palette in (voc, grey):
        values = np.zeros((48, 64), np.uint8)
        values[16:32], values[32:] = 1, 2
        im = Image.fromarray(values, mode="P")
        im.putpalette(palette)
        im.save(tmp_path / "values.png")
        assert np.array_equal(read_label(tmp_path / "values.png", generic), values)


def _write(path, text):
    path.write_text(text)
    return path


def test_label_values_no_class_claims_are_reported(tmp_path):
    """Values no class claims are read as ignore: a dataset that stored road as 40, or one with more classes than
    the class set, trained and evaluated without a word. The dataset now says which values, where and how much;
    void values (CamVid's 11, the gaps in Cityscapes' label ids, the ignore index) are not reported."""
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir(parents=True)
    for i in range(20):
        cv2.imwrite(str(tmp_path / "train" / "images" / f"f{i:02}.png"), np.zeros((16, 32, 3), np.uint8))
        lbl = np.full((16, 32), 11, np.uint8)  # void
        lbl[:4], lbl[4:6] = 0, 255
        if i in (5, 15):
            lbl[8:] = 40  # an export that wrote road as 40: half the file
            lbl[8, :8] = 12
        cv2.imwrite(str(tmp_path / "train" / "labels" / f"f{i:02}.png"), lbl)
    ds = build_dataset(DataSpec(str(tmp_path)), "train")
    warning = ds.unclaimed_values_warning(max_files=20)
    assert warning == ("label values 12, 40 belong to no class of 'camvid' (its classes take 0..10; 255 is ignore): "
                       f"2 of the 20 label files checked hold them (e.g. {tmp_path / 'train' / 'labels' / 'f05.png'}; "
                       "50.0% of their pixels), and they are read as unlabelled (ignored); check the label files, "
                       "or give the dataset a class file that names every value")
    assert "1 of the 5 label files checked" in ds.unclaimed_values_warning(max_files=5)  # f00, f05, f10, f14, f19
    clean = build_dataset(DataSpec(str(tmp_path)), "train", limit=5)
    assert clean.unclaimed_values_warning() is None
    _cityscapes_tree(tmp_path / "cs")  # label ids 0 (unlabelled), 7, 26, 33: no warning
    assert build_dataset(DataSpec(str(tmp_path / "cs")), "val").unclaimed_values_warning() is None


def _alias_bomb(depth):
    """A YAML flow list of a few hundred bytes whose anchors make lists of up to 10**depth elements (shared, not
    copied, by the loader): its str() or repr() is what costs, 10x per level."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]" for k in range(1, depth + 1)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("entry, message", [
    ("- {name: BOMB}", "class #0: the name must be text, got "),
    ("- {name: road, color: BOMB}", r"class #0 \('road'\): bad color "),
    ("- {name: road, id: BOMB}", r"the raw label value\) must be an integer in 0\.\.255, got "),
    ("- BOMB", "class #0: expected a name or a mapping with 'name', got "),
])
def test_a_class_file_of_yaml_aliases_is_refused_in_bounded_time_and_memory(tmp_path, entry, message):
    """A dataset's classes.yaml is read automatically: a few hundred bytes of YAML aliases make lists nested
    nine levels deep; their str() or repr() (a name taken as text, a value shown in an error) took 26 s and
    2.6 GB at depth 8, ~25 GB at depth 9. Now a name must be text and an error shows a bounded excerpt."""
    f = tmp_path / "classes.yaml"
    f.write_text("classes:\n  " + entry.replace("BOMB", _alias_bomb(9)) + "\n")
    with pytest.raises(DatasetError, match=message + r"\[\['x', 'x', 'x', 'x', \.\.\.\], \[\[") as info:
        load_class_file(f)
    assert len(str(info.value)) < 300 + len(str(f)), len(str(info.value))


def test_a_home_relative_root_and_class_file_choose_the_datasets_classes(tmp_path, monkeypatch):
    """``data.root=~/x`` (a shell leaves it as written) found the files, but the class set was chosen for the
    unexpanded path: a folder with a class file, or a Cityscapes tree, was trained with CamVid's classes."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _folders(tmp_path / "yard", lambda p, h, w: cv2.imwrite(str(p), np.zeros((h, w), np.uint8)), "classes: [a, b]\n")
    spec = DataSpec("~/yard", label_suffix="_mask")
    assert spec.root == str(tmp_path / "yard") and resolve_class_set(spec).classes == ("a", "b")
    _cityscapes_tree(tmp_path / "cs")
    assert build_dataset(DataSpec("~/cs"), "val").class_set is CITYSCAPES
    (tmp_path / "other.txt").write_text("x\ny\nz\n")
    assert resolve_class_set(DataSpec("~/yard", class_file="~/other.txt")).classes == ("x", "y", "z")


def test_grey_and_alpha_label_pngs_are_read_as_grey(tmp_path):
    """A grey + alpha PNG label (OpenCV reads it as 4 channels) holds class values in its grey channel; it was
    matched against the palette as a colour label and every pixel became ignore."""
    from PIL import Image

    values = np.array([[0, 3, 10, 11]] * 4, np.uint8)
    la = np.stack([values, np.full_like(values, 255)], axis=-1)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    np.testing.assert_array_equal(read_label(path, CAMVID_CLASSES), CAMVID_CLASSES.label_lut()[values])


def test_class_values_saved_as_rgb_are_read_as_grey_and_colour_labels_stay_colour(tmp_path):
    """A CamVid label (class values 0..11) saved with 3 equal channels (PIL's convert("RGB"), image editors) was
    matched against the palette as a colour label: every pixel ignore, loss 0, no word. A colour label whose
    colours are all grey (sky (128, 128, 128) and black void) is still a colour label; 0 only (black) cannot be
    told apart (class 0 saved as RGB, or a void-only colour label): refused naming the file."""
    src = sorted((require(CAMVID) / "train" / "labels").iterdir())[0]
    grey = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    assert grey.ndim == 2 and (grey == 11).any() and (grey < 11).any()
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), cv2.merge([grey, grey, grey]))
    np.testing.assert_array_equal(read_label(rgb, CAMVID_CLASSES), read_label(src, CAMVID_CLASSES))

    colour = np.zeros((4, 6, 3), np.uint8)  # CamVid colours: sky on the left, void (black) on the right
    colour[:, :3] = CAMVID_CLASSES.palette[0]
    cv2.imwrite(str(tmp_path / "colour.png"), colour[..., ::-1])
    expected = np.full((4, 6), IGNORE_INDEX, np.uint8)
    expected[:, :3] = 0
    np.testing.assert_array_equal(read_label(tmp_path / "colour.png", CAMVID_CLASSES), expected)

    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((4, 6, 3), np.uint8))  # all void, or all class 0: as before
    assert (read_label(tmp_path / "black.png", CAMVID_CLASSES) == IGNORE_INDEX).all()  # (not a run-stopping error)
    white = np.full((4, 6, 3), 255, np.uint8)  # ignore either way
    cv2.imwrite(str(tmp_path / "white.png"), white)
    assert (read_label(tmp_path / "white.png", CAMVID_CLASSES) == IGNORE_INDEX).all()


def test_16_bit_colour_labels_are_refused(tmp_path):
    """Colour matching ran on the 16-bit values: every pixel of a 16-bit RGB colour label became ignore."""
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[:] = np.array(CAMVID_CLASSES.palette[3], np.uint16) * 257
    path = tmp_path / "l16.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    with pytest.raises(DatasetError, match=f"label {path}: 16-bit colour label; colour labels must have 8 bits"):
        read_label(path, CAMVID_CLASSES)


def _grey_png(path, values, bits):
    """A grey PNG of the given bit depth holding ``values`` as its stored samples."""
    import struct
    import zlib

    rows = b"".join(b"\0" + np.packbits(np.unpackbits(r[:, None].astype(np.uint8), axis=1)[:, 8 - bits:].ravel())
                    .tobytes() for r in values)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], bits, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_low_bit_depth_grey_labels_give_their_stored_values(tmp_path):
    """OpenCV scales 1-, 2- and 4-bit grey samples to 0..255: a binary mask saved by PIL as mode '1' had its
    foreground 1 read as 255, the ignore index. The stored values are the class values."""
    from PIL import Image

    (tmp_path / "classes.txt").write_text("background\nforeground\n")
    classes = load_class_file(tmp_path / "classes.txt")
    mask = np.zeros((4, 8), bool)
    mask[:, 4:] = True
    Image.fromarray(mask).save(tmp_path / "mask1.png")  # mode '1': a 1-bit grey PNG
    assert (tmp_path / "mask1.png").read_bytes()[24] == 1
    np.testing.assert_array_equal(read_label(tmp_path / "mask1.png", classes), mask.astype(np.uint8))
    for bits, values in ((2, [0, 1, 2, 3] * 3), (4, list(range(12)))):
        ids = np.array([values] * 2, np.uint8)
        _grey_png(tmp_path / f"ids{bits}.png", ids, bits)
        np.testing.assert_array_equal(read_label(tmp_path / f"ids{bits}.png", CAMVID_CLASSES),
                                      CAMVID_CLASSES.label_lut()[ids])


def test_images_are_read_as_stored_whatever_their_exif_orientation(tmp_path):
    """OpenCV applied a JPEG's EXIF orientation to the image but not to its PNG label: a square frame was
    silently rotated against its label, another got a size error naming the label."""
    from PIL import Image

    from icnet_ros.data import read_image

    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir(parents=True)
    for name, (h, w) in {"square": (96, 96), "wide": (96, 128)}.items():
        image = np.zeros((h, w, 3), np.uint8)
        image[:, : w // 2] = 255
        label = np.ones((h, w), np.uint8)
        label[:, : w // 2] = 0
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        Image.fromarray(image).save(tmp_path / "train" / "images" / f"{name}.jpg", exif=exif.tobytes(), quality=95)
        Image.fromarray(label).save(tmp_path / "train" / "labels" / f"{name}.png")
        assert read_image(tmp_path / "train" / "images" / f"{name}.jpg").shape == (h, w, 3)
    ds = build_dataset(DataSpec(str(tmp_path), layout="camvid"), "train")
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert ((image[..., 0] > 127) == (label == 0)).all()


def test_one_frame_under_two_image_names_is_refused(tmp_path):
    """x.jpg and x.png both paired with x's label: the frame counted twice in training and evaluation."""
    for d in ("images", "labels"):
        (tmp_path / "val" / d).mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    for name in ("a.jpg", "a.png", "b.png"):
        cv2.imwrite(str(tmp_path / "val" / "images" / name), img)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / "val" / "labels" / name), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="a.jpg and a.png are one frame under two names"):
        find_samples(DataSpec(str(tmp_path)), "val")


def test_folders_without_class_file_is_an_error(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="needs a class file"):
        resolve_class_set(DataSpec(str(tmp_path), layout="folders"))
    with pytest.raises(DatasetError, match="unknown dataset layout 'camvd'; choose from auto, camvid"):
        resolve_class_set(DataSpec(str(tmp_path), layout="camvd"))


@pytest.mark.parametrize("image_dir, label_dir, bad", [
    ("{splt}/images", "{split}/labels", r"data.image_dir '\{splt\}/images'.*\{splt\}"),
    ("{split}/images", "{}/labels", r"data.label_dir '\{\}/labels'"),
    ("{split}/images", "{0}/labels", r"data.label_dir '\{0\}/labels'"),
])
def test_directory_pattern_typos_name_the_pattern(tmp_path, image_dir, label_dir, bad):
    with pytest.raises(DatasetError, match=bad + r".*the only field allowed is \{split\}"):
        find_samples(DataSpec(str(tmp_path), layout="camvid", image_dir=image_dir, label_dir=label_dir), "train")


def _png_header_only(path, w, h, color_type, palette=b""):
    """A PNG that declares w x h pixels but holds no image data (its header is all a size check may read)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
                     + (chunk(b"PLTE", palette) if palette else b"") + chunk(b"IDAT", zlib.compress(b"\x00" * 8))
                     + chunk(b"IEND", b""))


def test_images_declaring_too_many_pixels_are_refused_before_decoding(tmp_path):
    from icnet_ros.data import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == 50_000_000
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "train" / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    _png_header_only(tmp_path / "train" / "labels" / "a.png", 8000, 7000, 0)  # 56 MP grey: above the limit
    _png_header_only(tmp_path / "val" / "images" / "a.png", 7072, 7072, 2)  # 50.01 MP RGB
    # 256 MP paletted (Pillow itself calls it a decompression bomb): its size read from the IHDR, as every PNG's
    _png_header_only(tmp_path / "val" / "labels" / "a.png", 16000, 16000, 3, b"\x00\x00\x00" * 11)
    spec = DataSpec(str(tmp_path), layout="camvid")
    with pytest.raises(DatasetError, match=r"label .*train/labels/a.png: declares 8000x7000 = 56.0 megapixels, above "
                                           "the limit of 50 megapixels"):
        build_dataset(spec, "train")[0]
    with pytest.raises(DatasetError, match=r"image .*val/images/a.png: declares 7072x7072"):
        build_dataset(spec, "val")[0]
    with pytest.raises(DatasetError, match="label .*val/labels/a.png: declares 16000x16000 = 256.0 megapixels"):
        read_label(tmp_path / "val" / "labels" / "a.png", CAMVID_CLASSES)


def _png_with_text_chunk(w, h, rows=True, bad_crc=True):
    """A grey PNG declaring w x h pixels with a tEXt chunk; ``bad_crc``: the chunk fails its CRC check (Pillow then
    cannot parse the header; libpng warns and decodes the image). ``rows``: all its rows (class 3; 96 KB for
    10000 x 8000), else four."""
    import struct
    import zlib

    def chunk(kind, data, bad=False):
        crc = zlib.crc32(kind + data) ^ (1 if bad else 0)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    co = zlib.compressobj(9)
    idat = b"".join(co.compress(b"\0" + b"\3" * w) for _ in range(h if rows else 4)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"tEXt", b"Comment\0hello", bad=bad_crc) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _radiance_hdr(w, h, rows=True):
    """A Radiance HDR (a format OpenCV decodes and Pillow does not read) declaring w x h pixels. ``rows``: all its
    run-length encoded rows (5 MB for 10000 x 8000), else none."""
    runs = [127] * (w // 127) + ([w % 127] if w % 127 else [])
    line = bytes([2, 2, w >> 8, w & 255]) + b"".join(bytes(b for n in runs for b in (128 + n, v))
                                                      for v in (128, 64, 32, 129))
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y %d +X %d\n" % (h, w) + (line * h if rows else b"")


def _one_line_refusal(read, path, message):
    """``read(path)`` raises a one-line DatasetError starting with ``message``, having allocated no more than a few
    copies of the file (tracemalloc sees numpy's and OpenCV's arrays: a decoded image would show)."""
    import re
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="^" + re.escape(message)) as info:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert peak < 4 * path.stat().st_size + (8 << 20), peak


def test_a_label_whose_header_pillow_cannot_parse_is_checked_from_its_bytes(tmp_path):
    """The label's size check was Pillow's header parser, and a PNG it cannot parse (a tEXt chunk failing its CRC)
    went to cv2.imread unchecked: 96 KB declaring 10000x8000 (limit 50 megapixels) was decoded whole (0.6 s, 80 MB;
    20000x20000: +770 MB), and one declaring more than OpenCV's own 2**30 pixels raised a cv2.error traceback. Now a
    label's bytes go through the images' header walk (every chunk's CRC checked) before decoding: one line."""
    for (w, h), rows in (((10000, 8000), True), ((40000, 30000), False)):
        path = tmp_path / f"{w}x{h}.png"
        path.write_bytes(_png_with_text_chunk(w, h, rows))
        _one_line_refusal(lambda p: read_label(p, CAMVID_CLASSES), path,
                          f"cannot decode label {path}: PNG chunk b'tEXt' at byte 33 fails its CRC check")
    path = tmp_path / "valid.png"  # the same label with its CRC right: refused for its declared size
    path.write_bytes(_png_with_text_chunk(10000, 8000, bad_crc=False))
    _one_line_refusal(lambda p: read_label(p, CAMVID_CLASSES), path,
                      f"label {path}: declares 10000x8000 = 80.0 megapixels, above the limit of 50 megapixels")


def test_images_of_formats_whose_size_is_not_read_from_the_header_are_refused(tmp_path):
    """The images' header walk covers JPEG and PNG, and the Pillow check gave up on formats it does not read: a
    Radiance HDR named .jpg (5 MB declaring 10000x8000, limit 50 megapixels) was decoded to an 8000 x 10000 x 3
    image (+1.1 GB), and one declaring more than OpenCV's own 2**30 pixels raised a cv2.error traceback. Now such
    formats are refused before decoding, one line saying which formats are read; BMP, TIFF and WebP are read,
    within the limit (a BMP header declaring 10000x8000 is refused)."""
    from icnet_ros.data import read_image

    for (w, h), rows in (((10000, 8000), True), ((40000, 30000), False)):
        path = tmp_path / f"{w}x{h}.jpg"
        path.write_bytes(_radiance_hdr(w, h, rows))
        _one_line_refusal(read_image, path, f"cannot read image {path}: not a JPEG, PNG, BMP, TIFF or WebP file")
    image = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    for suffix in (".bmp", ".tif", ".webp"):
        lossless = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []
        cv2.imwrite(str(tmp_path / f"x{suffix}"), image, lossless)
        np.testing.assert_array_equal(read_image(tmp_path / f"x{suffix}"), image[..., ::-1])
    big = tmp_path / "big.bmp"
    big.write_bytes((tmp_path / "x.bmp").read_bytes()[:18] + (10000).to_bytes(4, "little")
                    + (8000).to_bytes(4, "little") + (tmp_path / "x.bmp").read_bytes()[26:])
    _one_line_refusal(read_image, big, f"image {big}: declares 10000x8000 = 80.0 megapixels, above the limit")


def test_an_opencv_error_while_decoding_is_a_dataset_error(tmp_path, monkeypatch):
    """A cv2.error from the decoder (a header OpenCV refuses, e.g. beyond its own pixel limit) escaped both
    readers: a traceback in icnet-eval (which reports DatasetError in one line) and a worker crash in training.
    Now a DatasetError naming the file and OpenCV's reason, without its source file and line."""
    from icnet_ros.data import read_image

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((4, 6), np.uint8))

    def refuse(*args):
        raise cv2.error("OpenCV(5.1.0) /io/loadsave.cpp:80: error: (-215:Assertion failed) pixels <= "
                        "CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(cv2, "imread", refuse)
    for read, what in ((read_image, "image"), (lambda p: read_label(p, CAMVID_CLASSES), "label")):
        with pytest.raises(DatasetError, match=f"^cannot decode {what} {path}: \\(-215:Assertion failed\\) pixels "
                                               "<= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'$"):
            read(path)


def test_collate_stacks_equal_sizes_and_lists_mixed_sizes(tmp_path):
    _folders(tmp_path, lambda p, h, w: cv2.imwrite(str(p), np.zeros((h, w), np.uint8)), "classes: [a]\n",
             sizes=((48, 64), (64, 80)))
    ds = build_dataset(DataSpec(str(tmp_path), label_suffix="_mask"), "train")
    images, labels = collate_segmentation([ds[0], ds[1]])
    assert isinstance(images, list) and images[1].shape == (64, 80, 3) and labels[0].shape == (48, 64)
    images, labels = collate_segmentation([ds[0], ds[0]])
    assert images.shape == (2, 48, 64, 3) and labels.shape == (2, 48, 64)


# ------------------------------------------------------------------------------------------------ transforms

def _coded_pair(h=90, w=120):
    """Blocks of classes 0..5; the image encodes the class in every channel (value 40 * class)."""
    label = np.zeros((h, w), np.uint8)
    for k in range(6):
        label[(k // 3) * (h // 2):, (k % 3) * (w // 3):] = k
    label[:5, :5] = IGNORE_INDEX
    image = np.repeat((label.astype(np.int32) * 40 % 256).astype(np.uint8)[..., None], 3, axis=2)
    return image, label


def test_geometry_is_identical_for_image_and_label():
    image, label = _coded_pair()
    t = train_transforms((64, 80), ratio_range=(0.6, 1.8), scale=1.0, cat_max_ratio=0.75, flip_prob=0.5,
                         photometric=False, pad_value=(7, 7, 7))
    for seed in range(12):
        img, lab = t(image, label, np.random.default_rng(seed))
        assert img.shape == (64, 80, 3) and lab.shape == (64, 80) and lab.dtype == np.uint8
        # labels are resized with nearest neighbour: only original values appear
        assert set(np.unique(lab)) <= set(range(6)) | {IGNORE_INDEX}
        labelled = lab != IGNORE_INDEX
        agree = img[..., 0][labelled] == (lab[labelled].astype(np.int32) * 40)
        assert agree.mean() > 0.9, f"seed {seed}: image/label misaligned ({agree.mean():.2f})"


def test_resized_labels_take_the_source_pixel_under_their_centre():
    """Labels follow the bilinear image's pixel-centre geometry: a one-pixel pole at an odd column survives a x0.5
    resize where the image keeps half its colour (cv2.INTER_NEAREST sampled even columns only and lost it), and
    every resized label pixel is the source pixel under its centre, at down- and upscales."""
    from icnet_ros.data import resize_pair

    image = np.zeros((20, 20, 3), np.uint8)
    label = np.zeros((20, 20), np.uint8)
    image[:, 5], label[:, 5] = 255, 2  # a pole one pixel wide at column 5
    img, lab = resize_pair(image, label, (10, 10))
    assert img[:, 2, 0].min() >= 120 and (lab[:, 2] == 2).all() and (lab == 2).sum() == 10
    rng = np.random.default_rng(0)
    src = rng.integers(0, 11, (37, 53)).astype(np.uint8)
    for h, w in ((18, 26), (24, 35), (56, 80), (83, 119), (37, 53)):
        _, lab = resize_pair(np.zeros((37, 53, 3), np.uint8), src, (h, w))
        rows = np.minimum(((np.arange(h) + 0.5) * 37 / h).astype(int), 36)
        cols = np.minimum(((np.arange(w) + 0.5) * 53 / w).astype(int), 52)
        np.testing.assert_array_equal(lab, src[rows][:, cols], err_msg=f"{h}x{w}")


def test_random_resize_range_and_input_scale():
    image, label = _coded_pair(100, 200)
    sizes = {RandomResize((0.5, 2.0), scale=2.0)(image, label, np.random.default_rng(s))[0].shape[:2]
             for s in range(20)}
    assert all(100 <= h <= 400 and abs(w - 2 * h) <= 1 for h, w in sizes) and len(sizes) > 5
    img, lab = RandomResize((1.0, 1.0), base_size=(50, 100))(image, label, np.random.default_rng(0))
    assert img.shape[:2] == lab.shape == (50, 100)


def test_random_resize_is_bounded_for_every_frame(monkeypatch):
    """The training config is checked against the first frame only: a 50-megapixel frame further on was resized
    by up to 2x, hundreds of megapixels per sample and worker. No frame is resized above MAX_RESIZED_PIXELS (here
    lowered to 30,000) whatever the ratio drawn; smaller frames keep their ratio."""
    import icnet_ros.data.transforms as transforms

    monkeypatch.setattr(transforms, "MAX_RESIZED_PIXELS", 30_000)
    image, label = _coded_pair(100, 200)
    img, lab = RandomResize((2.0, 2.0))(image, label, np.random.default_rng(0))
    assert img.shape[:2] == lab.shape == (122, 245)  # sqrt(30000 / 20000) = 1.22
    small, _ = _coded_pair(50, 100)
    assert RandomResize((2.0, 2.0))(small, small[..., 0], np.random.default_rng(0))[0].shape[:2] == (100, 200)


def test_random_crop_caps_the_share_of_one_class():
    label = np.zeros((200, 200), np.uint8)
    label[:, 150:] = 1  # class 0 covers 75% of the image; crops on the left are all class 0
    image = np.zeros((200, 200, 3), np.uint8)
    capped = RandomCrop((100, 100), cat_max_ratio=0.75, max_tries=10)
    uncapped = RandomCrop((100, 100), cat_max_ratio=1.0)

    def share_of_top_class(lab):
        counts = np.bincount(lab.ravel(), minlength=2)
        return counts.max() / counts.sum()

    capped_ok = np.mean([share_of_top_class(capped(image, label, np.random.default_rng(s))[1]) < 0.75
                         for s in range(40)])
    uncapped_ok = np.mean([share_of_top_class(uncapped(image, label, np.random.default_rng(s))[1]) < 0.75
                           for s in range(40)])
    assert capped_ok > 0.9 and uncapped_ok < 0.5


def test_random_crop_pads_small_images_with_ignore():
    image, label = _coded_pair(50, 60)
    img, lab = RandomCrop((64, 80), pad_value=(123, 117, 104))(image, label, np.random.default_rng(0))
    assert img.shape == (64, 80, 3) and lab.shape == (64, 80)
    assert (lab[50:] == IGNORE_INDEX).all() and (lab[:, 60:] == IGNORE_INDEX).all()
    assert (img[50:] == (123, 117, 104)).all()
    assert np.array_equal(lab[:50, :60], label) and np.array_equal(img[:50, :60], image)


def test_flip_and_photometric_distortion():
    image, label = _coded_pair()
    img, lab = RandomFlip(1.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(img, image[:, ::-1]) and np.array_equal(lab, label[:, ::-1])
    rng_img = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    changed = 0
    for s in range(8):
        out, lab = PhotoMetricDistortion()(rng_img, label[:40, :50], np.random.default_rng(s))
        assert out.dtype == np.uint8 and out.shape == rng_img.shape and np.array_equal(lab, label[:40, :50])
        changed += not np.array_equal(out, rng_img)
    assert changed >= 6
    # brightness is clipped before the contrast, as mmseg's: a pixel at 250 brightened past 255 and then halved is
    # 255 * 0.5, never more (unclipped, 250 + 30 halved was 140)
    bright = np.full((8, 8, 3), 250, np.uint8)
    halving = PhotoMetricDistortion(contrast_range=(0.5, 0.5), saturation_range=(1, 1), hue_delta=0)
    values = {int(halving(bright, label[:8, :8], np.random.default_rng(s))[0][0, 0, 0]) for s in range(40)}
    assert max(v for v in values if v < 200) == 128 and 128 in values and len(values) > 3, values
    # deterministic given the generator
    a = PhotoMetricDistortion()(rng_img, label, np.random.default_rng(5))[0]
    assert np.array_equal(a, PhotoMetricDistortion()(rng_img, label, np.random.default_rng(5))[0])


def test_dataset_augmentation_depends_only_on_the_sample_seed():
    root = require(CAMVID)
    t = train_transforms((96, 128), scale=0.5, photometric=True)
    ds = build_dataset(DataSpec(str(root)), "train", transform=t, limit=2)
    a, b = ds[(1, 1234)], ds[(1, 1234)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (96, 128, 3)
    c = ds[(1, 99)]
    assert not torch.equal(a[0], c[0])


def test_an_int_key_gives_the_same_sample_every_time(tmp_path):
    """dataset[i] (what an int sampler such as ShardSampler yields) ran the augmentation with fresh OS entropy: each
    read of a sample another scale, crop, flip and colour, against the docstring ('without augmentation
    randomness'). Now the index fixes it: dataset[i] is dataset[(i, i)], and dataset[-1] the last sample's."""
    _folders(tmp_path, lambda p, h, w: cv2.imwrite(str(p), (np.arange(h * w) % 3).reshape(h, w).astype(np.uint8)),
             "classes: [a, b, c]\n")
    ds = build_dataset(DataSpec(str(tmp_path), label_suffix="_mask"), "train", transform=train_transforms((32, 48)))
    a, b, c, last = ds[1], ds[1], ds[(1, 1)], ds[-1]
    assert a[0].shape == (32, 48, 3) and a[1].shape == (32, 48)
    for other in (b, c, last):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


# ------------------------------------------------------------------------------------------------ samplers

def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batch_sampler_resumes_and_shards():
    full = _take(iter(TrainBatchSampler(10, 3, seed=4)), 12)  # 3 batches per epoch
    assert all(len(b) == 3 for b in full)
    epoch0 = [i for b in full[:3] for i, _ in b]
    assert len(set(epoch0)) == 9  # a permutation, partial batch dropped
    assert full[:3] != full[3:6]  # new order each epoch
    resumed = _take(iter(TrainBatchSampler(10, 3, seed=4, start=5)), 7)
    assert resumed == full[5:]
    # two ranks: disjoint positions of the same permutation, together one global batch
    r0 = _take(iter(TrainBatchSampler(10, 2, seed=4, rank=0, world_size=2)), 2)
    r1 = _take(iter(TrainBatchSampler(10, 2, seed=4, rank=1, world_size=2)), 2)
    ids = [i for b in r0 + r1 for i, _ in b]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
    # dataset smaller than a global batch: tiled, still full batches
    small = _take(iter(TrainBatchSampler(2, 2, seed=0, rank=1, world_size=2)), 3)
    assert all(len(b) == 2 and {i for i, _ in b} <= {0, 1} for b in small)
    with pytest.raises(ValueError):
        TrainBatchSampler(0, 2)


def test_a_generated_class_color_never_repeats_one_given_in_the_file(tmp_path):
    """'car' without a color got the generated (0, 128, 0), which 'grass' names: color labels read grass pixels as
    car and grass was never trained. Generated colors now skip the ones the file gives."""
    f = tmp_path / "classes.yaml"
    f.write_text("classes:\n  - road\n  - car\n  - {name: grass, color: [0, 128, 0]}\n")
    cs = load_class_file(f)
    assert cs.palette[0] == (128, 0, 0) and cs.palette[2] == (0, 128, 0)  # road keeps its generated color
    assert len(set(cs.palette)) == 3
    from icnet_ros.data.datasets import colors_to_ids

    rgb = np.array([[cs.palette[1], (0, 128, 0)]], np.uint8)
    assert colors_to_ids(rgb, cs).tolist() == [[1, 2]]


def test_random_crop_does_not_settle_on_windows_without_labelled_pixels():
    """A window with no labelled pixel ended the search for a class-balanced crop at once: on a label whose top 60%
    is void, 3 crops in 4 carried no loss. Such windows are redrawn, as mmseg does."""
    label = np.full((300, 300), 255, np.uint8)
    label[180:, :150], label[180:, 150:] = 0, 1
    image = np.zeros((300, 300, 3), np.uint8)
    crop = RandomCrop((128, 128), cat_max_ratio=0.75, max_tries=10)
    empty = np.mean([(crop(image, label, np.random.default_rng(s))[1] == 255).all() for s in range(200)])
    assert empty < 0.1, empty


def test_colour_labels_refuse_a_palette_with_one_colour_for_two_classes():
    """A model's metadata may give two classes one colour (class files refuse that): icnet-eval on generic folders
    without a class file read colour labels with it, and road and sidewalk pixels both became road."""
    from icnet_ros.classes import class_set_from_meta

    cs = class_set_from_meta({"classes": ["road", "sidewalk", "car"],
                              "palette": [[128, 64, 128], [128, 64, 128], [0, 0, 142]]})
    label = np.array([[[128, 64, 128], [0, 0, 142]]], np.uint8)
    with pytest.raises(DatasetError, match="road, sidewalk share a colour"):
        colors_to_ids(label, cs)


def test_the_dataset_reader_refuses_huge_files_unread_and_scan_bombs_from_the_header(tmp_path):
    """The CLIs' reader refused these; icnet-eval, training and INT8 calibration read a 200 GB sparse file whole
    (a MemoryError traceback) and decoded a JPEG of 150 scans (seconds for a large one, libjpeg on stderr)."""
    from helpers import jpeg_of_many_scans
    from icnet_ros.data import read_image

    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(200 << 30)
    with pytest.raises(DatasetError, match=f"^image {huge}: a file of {200 << 30} bytes is larger than any image"):
        read_image(huge)
    bomb = tmp_path / "scans.jpg"
    bomb.write_bytes(jpeg_of_many_scans(150))
    with pytest.raises(DatasetError, match=f"cannot decode image {bomb}: JPEG has more than 100 scans"):
        read_image(bomb)
    fine = tmp_path / "fine.jpg"
    fine.write_bytes(jpeg_of_many_scans(0))
    assert read_image(fine).shape == (64, 64, 3)
