"""mmseg checkpoint import: parity with the reference implementation, icnet-convert, and its error paths."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import record_icnet_builds, signal_once_torch_loads

from icnet_ros import CheckpointError, load_model, read_metadata
from icnet_ros.convert import import_mmseg_checkpoint, infer_config, read_torch_checkpoint, stored_fp16
from icnet_ros.tools.convert import main as convert_main

reference = pytest.importorskip("icnet_ros.reference")


def _mmseg_model(depth, num_classes=19, width=1.0, seed=0):
    """mmseg's ICNet with random weights and non-trivial BN statistics (so BN is not an identity)."""
    try:
        model = reference.build_mmseg_icnet(depth, num_classes, width)
    except reference.MMSegUnavailable as e:
        if os.environ.get("CI"):
            raise  # the parity test must run in CI
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return model.eval()


@pytest.mark.mmseg
@pytest.mark.parametrize("depth, sizes", [(18, [(256, 512), (193, 321)]), (50, [(128, 256), (161, 243)])])
def test_parity_with_mmseg(tmp_path, depth, sizes):
    ref = _mmseg_model(depth)
    path = tmp_path / f"icnet_r{depth}.pth"
    torch.save({"meta": {"dataset_meta": {"classes": [f"c{i}" for i in range(19)]}}, "state_dict": ref.state_dict()},
               path)
    ours = import_mmseg_checkpoint(path)
    assert ours.config.backbone == f"resnet{depth}" and ours.config.num_classes == 19
    assert ours.meta["classes"][0] == "c0"
    g = torch.Generator().manual_seed(1)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            expected = reference.mmseg_logits(ref, x)
            got = ours(x)
        assert got.shape == expected.shape == (2, 19, -(-h // 8), -(-w // 8))
        rel = ((got - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-5, f"R{depth} at {h}x{w}: max |ours - ref| / max |ref| = {rel:.2e}"


@pytest.mark.mmseg
def test_width_half_matches_mmseg_with_scaled_channels(tmp_path):
    ref = _mmseg_model(18, num_classes=5, width=0.5)
    path = tmp_path / "half.pth"
    torch.save(ref.state_dict(), path)  # bare state_dict, no wrapper
    ours = import_mmseg_checkpoint(path)
    assert ours.config.width == 0.5 and ours.config.num_classes == 5 and ours.meta["classes"][0] == "class_0"
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        expected, got = reference.mmseg_logits(ref, x), ours(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.fixture(scope="module")
def mmseg_r18_file(tmp_path_factory):
    """A real mmseg-layout checkpoint file (DDP 'module.' prefix, mmseg 0.x meta with CLASSES/PALETTE)."""
    from icnet_ros.models import build_icnet

    model = build_icnet("icnet_r18", width=0.25, num_classes=3)
    state = {("module." + k.replace("backbone.ppm.", "backbone.")): v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("mm") / "icnet_r18.pth"
    torch.save({"meta": {"CLASSES": ("road", "car", "sky"), "PALETTE": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                         "mmcv_version": "1.3.13", "iter": 160000},
                "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path, model


def test_convert_cli_round_trip(tmp_path, mmseg_r18_file, capsys):
    src, model = mmseg_r18_file
    dst = tmp_path / "out" / "model.safetensors"
    assert convert_main([str(src), str(dst), "--fp16", "--input-size", "512", "1024"]) == 0
    assert "resnet18 width 0.25, 3 classes" in capsys.readouterr().out
    loaded = load_model(dst)
    assert loaded.meta["classes"] == ["road", "car", "sky"] and loaded.meta["palette"][2] == [7, 8, 9]
    assert loaded.meta["input_size"] == [512, 1024]
    assert loaded.meta["normalization"]["mean"] == [123.675, 116.28, 103.53]
    assert loaded.meta["provenance"]["source"] == "mmsegmentation" and loaded.meta["provenance"]["iter"] == 160000
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()  # fp16 storage


def test_export_native_checkpoint_for_deployment(tmp_path, capsys):
    """A training run's checkpoint -> fp16 without auxiliary heads; metadata kept, the export recorded."""
    import hashlib

    from safetensors.torch import load_file

    from helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "best.safetensors", provenance={"source": "icnet-train", "iterations": 7},
                          input_size=(360, 480))
    original = load_model(src)
    assert original.config.aux_heads
    dst = tmp_path / "deploy" / "model.safetensors"
    assert convert_main([str(src), str(dst), "--fp16", "--no-aux"]) == 0
    assert "11 classes (camvid)" in capsys.readouterr().out
    tensors = load_file(str(dst))
    assert not any(k.startswith("auxiliary_head.") for k in tensors)
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    exported = load_model(dst)
    meta = exported.meta
    assert not exported.config.aux_heads and meta["arch"]["aux_heads"] is False
    assert meta["classes"] == original.meta["classes"] and meta["palette"] == original.meta["palette"]
    assert meta["input_size"] == [360, 480] and meta["normalization"] == original.meta["normalization"]
    prov = meta["provenance"]
    assert prov["source"] == "icnet-train" and prov["iterations"] == 7
    assert prov["exported"] == {"from": "best.safetensors", "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                                "fp16": True, "auxiliary_heads": False}
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(x), exported(x)
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()  # fp16 storage
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99

    # in place, with a new recommended size: the source is read whole before it is replaced
    assert convert_main([str(dst), str(dst), "--input-size", "720", "960"]) == 0
    again = load_model(dst).meta
    record = again["provenance"]["exported"]
    assert again["input_size"] == [720, 960] and record["from"] == "model.safetensors"
    assert record["input_size"] == [720, 960] and record["previous"] == prov["exported"]
    # 'native' removes the recommended size (a run validated at a fixed size records it; it would squash 16:9
    # frames), and the removal is recorded too
    assert convert_main([str(dst), str(dst), "--input-size", "native"]) == 0
    native = load_model(dst).meta
    assert native["input_size"] is None
    assert native["provenance"]["exported"]["input_size"] is None
    assert native["provenance"]["exported"]["previous"] == record
    for bad in (["720"], ["720", "wide"], ["native", "960"], ["32", "32"]):
        assert convert_main([str(dst), str(tmp_path / "bad.safetensors"), "--input-size", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icnet-convert: error:") and "size" in err and err.count("\n") == 1, (bad, err)
        assert not (tmp_path / "bad.safetensors").exists()
    # network width (input_size auto) and license: set, kept by later exports, removed; each change recorded
    licence = "CC BY-NC 4.0 (trained on CamVid; non-commercial use only)"
    assert convert_main([str(dst), str(dst), "--network-width", "736", "--license", licence]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"network width 736; license: {licence}")
    recorded = load_model(dst).meta
    assert recorded["network_width"] == 736 and recorded["license"] == licence
    assert recorded["provenance"]["exported"]["network_width"] == 736
    assert recorded["provenance"]["exported"]["license"] == licence
    assert convert_main([str(dst), str(tmp_path / "kept.safetensors"), "--fp16"]) == 0
    kept = load_model(tmp_path / "kept.safetensors").meta
    assert kept["network_width"] == 736 and kept["license"] == licence
    assert "network_width" not in kept["provenance"]["exported"]  # nothing changed, nothing recorded
    assert convert_main([str(dst), str(dst), "--network-width", "none", "--license", ""]) == 0
    removed = load_model(dst).meta
    assert "network_width" not in removed and "license" not in removed
    assert removed["provenance"]["exported"]["network_width"] is None
    for bad, message in ((["--network-width", "wide"], "--network-width takes"),
                         (["--network-width", "16"], "invalid network_width"),
                         (["--license", "two\nlines"], "invalid license")):
        assert convert_main([str(dst), str(tmp_path / "bad.safetensors"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icnet-convert: error:") and message in err and err.count("\n") == 1, (bad, err)
        assert not (tmp_path / "bad.safetensors").exists()
    # a native checkpoint carries its own classes
    assert convert_main([str(src), str(tmp_path / "x.safetensors"), "--classes", "cityscapes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-convert: error:") and "classes are recorded in it" in err and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-convert: error: checkpoint not found") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_in_place_only_rerecords_and_flags_are_worded_as_flags(tmp_path, capsys):
    """Into the source itself (also spelt another way): recording a size or a license stays possible, but --fp16,
    --no-aux and --average, which cannot be undone, are refused and the source is untouched (before: it was
    replaced). A bad --input-size is the flag's value, not 'invalid input_size in metadata' (which blamed the
    source file). A native checkpoint named in capitals (.SAFETENSORS) is read as one, not as an mmseg .pth."""
    from helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "best.safetensors")
    before = src.read_bytes()
    for flags in (["--fp16"], ["--no-aux"], ["--average", str(src)]):
        assert convert_main([str(src), str(tmp_path / "." / "best.safetensors"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err == (f"icnet-convert: error: {tmp_path / '.' / 'best.safetensors'} is the source file: --fp16, "
                       "--no-aux and --average cannot be undone; write the result to another file\n"), err
        assert src.read_bytes() == before
    for size, shown in ((["32", "32"], "32x32"), (["100000x100000"], "100000x100000")):
        assert convert_main([str(src), str(tmp_path / "x.safetensors"), "--input-size", *size]) == 2
        err = capsys.readouterr().err
        assert err == (f"icnet-convert: error: input size {shown}: each side must be >= 64 and the whole at most "
                       "16777216 pixels (4096x4096): every frame runs at it\n"), err
    # re-recording an fp16 file keeps it fp16 (the default model, 6.6 MB, became 13.2 MB of fp32)
    half = tmp_path / "half.safetensors"
    assert convert_main([str(src), str(half), "--fp16"]) == 0
    size = half.stat().st_size
    assert convert_main([str(half), str(half), "--license", "CC BY 4.0"]) == 0
    assert ", fp16" in capsys.readouterr().out
    assert stored_fp16(half) and abs(half.stat().st_size - size) < 1000 and not stored_fp16(src)
    assert load_model(half).meta["license"] == "CC BY 4.0"
    assert load_model(half).meta["provenance"]["exported"]["fp16"] is True
    upper = tmp_path / "COPY.SAFETENSORS"
    upper.write_bytes(before)
    assert convert_main([str(upper), str(tmp_path / "y.safetensors"), "--fp16"]) == 0
    assert load_model(tmp_path / "y.safetensors").config == load_model(src).config


def test_convert_refuses_an_output_that_is_not_safetensors(tmp_path, capsys):
    """The output is always written as safetensors: before, 'out.pth' was written (exit 0) and no tool opened it
    ('unknown model file type'). Refused before the source is read."""
    src = tmp_path / "src.safetensors"
    src.write_bytes(b"never read")
    for dst in ("out.pth", "out.onnx", "out"):
        assert convert_main([str(src), str(tmp_path / dst)]) == 2
        err = capsys.readouterr().err
        assert err == (f"icnet-convert: error: {tmp_path / dst}: the output must be a .safetensors file (icnet-convert "
                       "writes a native icnet_ros checkpoint; icnet-export writes .onnx and OpenVINO files)\n"), err
        assert not (tmp_path / dst).exists()


def test_truncated_and_corrupt_pth(tmp_path, mmseg_r18_file):
    src, _ = mmseg_r18_file
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_torch_checkpoint(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(\.pth\)"):
        read_torch_checkpoint(junk)


def test_compressed_pth_records_are_refused_before_they_are_inflated(tmp_path, mmseg_r18_file):
    """torch.save stores its zip records uncompressed; a DEFLATE record of zeros inflates about 1000:1 inside
    torch.load (a 3.7 MB file: 11.7 s, 4 GB), so compressed records are refused first, here a real checkpoint
    repacked."""
    import zipfile

    src, _ = mmseg_r18_file
    read_torch_checkpoint(src)  # torch.save's own file loads
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(CheckpointError, match=r"refusing to load: \d+ compressed record"):
        read_torch_checkpoint(packed)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_torch_checkpoint(evil)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_refusal_does_not_advise_weights_only_false(tmp_path, zip_format):
    """The refusal keeps what torch's weights-only unpickler objected to, not its advice to re-run torch.load
    with weights_only=False (or to allowlist the global): both would run the file's code."""
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, evil, pickle_protocol=2,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        read_torch_checkpoint(evil)
    message = str(e.value)
    assert "system" in message and "\n" not in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message and "trust" not in message, message


def test_a_file_that_is_no_pytorch_checkpoint_is_named_so(tmp_path, capsys):
    """An .onnx, a JPEG or a .safetensors given as the mmseg .pth is neither a zip archive nor a pickle: before,
    torch's weights-only unpickler failed on it and the message said the file held Python objects that could run
    code, quoting torch's advice to load it with weights_only=False."""
    onnx = tmp_path / "road.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(200))
    jpeg = tmp_path / "frame.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    for path in (onnx, jpeg):
        with pytest.raises(CheckpointError, match=r"not a PyTorch checkpoint \(\.pth\)") as e:
            read_torch_checkpoint(path)
        assert "Python objects" not in str(e.value) and "weights_only" not in str(e.value)
    assert convert_main([str(onnx), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"icnet-convert: error: {onnx}: not a PyTorch checkpoint (.pth)") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_not_icnet_checkpoints(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(10, 512)}, resnet)
    with pytest.raises(CheckpointError, match="not an ICNet checkpoint"):
        import_mmseg_checkpoint(resnet)
    other = tmp_path / "pspnet.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(19, 512, 1, 1)}}, other)
    with pytest.raises(CheckpointError, match="another mmseg segmentor"):
        import_mmseg_checkpoint(other)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_torch_checkpoint(notdict)


def test_missing_unexpected_and_mismatched_mmseg_keys(tmp_path, mmseg_r18_file):
    src, _ = mmseg_r18_file
    state, _ = read_torch_checkpoint(src)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "neck.cff_12.conv_high.bn.weight"}, "missing keys"),
        "unexpected": (dict(state, **{"backbone.extra.weight": torch.zeros(1)}), "unexpected keys"),
        "shape": (dict(state, **{"neck.cff_12.conv_high.conv.weight": torch.zeros(33, 16, 1, 1)}), "shape mismatch"),
        "layout": ({k: v for k, v in state.items() if not k.startswith("backbone.backbone.layer3.1.")},
                   "unsupported ResNet layout"),
    }
    for name, (bad, match) in cases.items():
        p = tmp_path / f"{name}.pth"
        torch.save({"state_dict": bad}, p)
        with pytest.raises(CheckpointError, match=match):
            import_mmseg_checkpoint(p)


def test_infer_config_variants():
    from icnet_ros.models import build_icnet

    for arch, kw in [("icnet_r50", {"width": 0.5}), ("icnet_r18", {"aux_heads": False})]:
        m = build_icnet(arch, **kw)
        state = {k.replace("backbone.ppm.", "backbone."): v for k, v in m.state_dict().items()}
        cfg = infer_config(state)
        assert (cfg.backbone, cfg.width, cfg.ppm, cfg.aux_heads) == (
            m.config.backbone, m.config.width, m.config.ppm, m.config.aux_heads)
    # sum pooling (no per-bin convolutions) is not mmseg's: it was imported with mmseg's fusion (13% off)
    m = build_icnet("icnet_r50_half")
    with pytest.raises(CheckpointError, match="no pyramid-pooling convolutions .*not an mmseg ICNet checkpoint"):
        infer_config({k.replace("backbone.ppm.", "backbone."): v for k, v in m.state_dict().items()})


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_infer_config_maps_each_resnet_depth(depth):
    """BasicBlock (2, 2, 2, 2) is R18 and (3, 4, 6, 3) R34; Bottleneck (3, 4, 6, 3) is R50 and (3, 4, 23, 3) R101
    (built on the meta device: shapes only)."""
    from icnet_ros.models import build_icnet
    from icnet_ros.models.icnet import ICNetConfig

    with torch.device("meta"):
        m = build_icnet(ICNetConfig(backbone=f"resnet{depth}", num_classes=7))
    state = {k.replace("backbone.ppm.", "backbone."): v for k, v in m.state_dict().items()}
    assert infer_config(state).backbone == f"resnet{depth}"


def test_a_19_class_mmseg_checkpoint_without_class_names_is_cityscapes(tmp_path, capsys):
    """mmseg's ICNet checkpoints are Cityscapes models: 19 classes and no (usable) class names in the file's meta
    give Cityscapes' names and palette; names of the right count without a palette keep the names."""
    from icnet_ros.classes import CITYSCAPES, generic_palette
    from icnet_ros.models import build_icnet

    model = build_icnet("icnet_r18", width=0.25, num_classes=19)
    state = {k.replace("backbone.ppm.", "backbone."): v for k, v in model.state_dict().items()}
    for i, wrapper in enumerate(({"state_dict": state}, {"meta": {"CLASSES": ["road"]}, "state_dict": state})):
        src, dst = tmp_path / f"city{i}.pth", tmp_path / f"city{i}.safetensors"
        torch.save(wrapper, src)
        assert convert_main([str(src), str(dst)]) == 0
        assert "19 classes" in capsys.readouterr().out
        meta = read_metadata(dst)
        assert meta["dataset"] == "cityscapes" and meta["classes"] == list(CITYSCAPES.classes)
        assert meta["palette"] == [list(c) for c in CITYSCAPES.palette]
    names = [f"c{i}" for i in range(19)]
    torch.save({"meta": {"dataset_meta": {"classes": names}}, "state_dict": state}, tmp_path / "named.pth")
    meta = import_mmseg_checkpoint(tmp_path / "named.pth").meta
    assert meta["classes"] == names and meta["palette"] == [list(c) for c in generic_palette(19)]


def test_no_aux_drops_the_auxiliary_heads_of_an_mmseg_checkpoint(tmp_path, mmseg_r18_file, capsys):
    """--no-aux on a .pth conversion: the written file has no auxiliary-head tensors and says so in its arch;
    without the flag they are kept."""
    from safetensors import safe_open

    src, model = mmseg_r18_file
    assert model.config.aux_heads
    for flags, aux in (([], True), (["--no-aux"], False)):
        dst = tmp_path / f"aux_{aux}.safetensors"
        assert convert_main([str(src), str(dst), *flags]) == 0
        capsys.readouterr()
        with safe_open(str(dst), "pt") as f:
            assert any(k.startswith("auxiliary_head.") for k in f.keys()) == aux
        assert read_metadata(dst)["arch"]["aux_heads"] == aux
        loaded = load_model(dst)
        x = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-5)


def test_hostile_pth_tensors_are_refused_before_memory_is_spent(tmp_path, mmseg_r18_file, monkeypatch):
    """A stride-0 view declares any shape over one stored number (an 85 KB file imported as a 4.3 GB ResNet-101
    at width 4, written out as a 4.27 GB checkpoint); a stem claiming width 4 over small tensors built that model
    (3 GB) before comparing shapes. Views are refused, the inferred model is compared on the meta device first."""
    import icnet_ros.convert as convert

    src, _ = mmseg_r18_file
    state, _ = read_torch_checkpoint(src)
    key = "decode_head.conv_seg.weight"
    viewed = dict(state, **{key: torch.zeros(1).expand(*state[key].shape)})
    p = tmp_path / "view.pth"
    torch.save({"state_dict": viewed}, p)
    with pytest.raises(CheckpointError, match=f"tensor {key} of shape .* repeats stored values"):
        read_torch_checkpoint(p)
    # dense tensors in another layout are what a model trained in channels_last saves: accepted
    cl = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v) for k, v in state.items()}
    p = tmp_path / "channels_last.pth"
    torch.save({"state_dict": cl}, p)
    assert not cl["backbone.backbone.stem.0.weight"].is_contiguous()
    assert import_mmseg_checkpoint(p) is not None
    wide = dict(state, **{"backbone.backbone.stem.0.weight": torch.zeros(128, 3, 3, 3)})  # width 4.0
    p = tmp_path / "wide.pth"
    torch.save({"state_dict": wide}, p)
    built = record_icnet_builds(monkeypatch, convert)
    with pytest.raises(CheckpointError, match="does not match the ICNet architecture"):
        import_mmseg_checkpoint(p)
    assert built == ["meta"]


def test_mmseg_metadata_of_the_wrong_type_and_bad_tensors(tmp_path, mmseg_r18_file, capsys):
    """mmseg meta values of another type fall back to generic classes (they were TypeError / AttributeError /
    OverflowError tracebacks); tensor names that are not text and NaN weights are one-line errors."""
    src, _ = mmseg_r18_file
    state, _ = read_torch_checkpoint(src)
    for i, meta in enumerate(({"CLASSES": 3}, {"CLASSES": ("a", "b", "c"), "PALETTE": 7},
                              {"dataset_meta": ["road"]},
                              {"CLASSES": ("a", "b", "c"), "PALETTE": [[float("inf"), 0, 0]] * 3},
                              {"CLASSES": ("a", "b", "c"), "PALETTE": [["1", "2", "3"]] * 3})):
        p = tmp_path / f"meta{i}.pth"
        torch.save({"meta": meta, "state_dict": state}, p)
        model = import_mmseg_checkpoint(p)
        names = model.meta["classes"]
        assert names in (["a", "b", "c"], ["class_0", "class_1", "class_2"]), names
        assert all(isinstance(v, int) for c in model.meta["palette"] for v in c)
    cases = {"keys": ({0: state[next(iter(state))], **state}, "tensor names must be text"),
             "nan": (dict(state, **{"decode_head.conv_seg.weight": torch.full_like(
                 state["decode_head.conv_seg.weight"], float("nan"))}), "holds NaN or infinite values")}
    for name, (bad, match) in cases.items():
        p = tmp_path / f"{name}.pth"
        torch.save({"state_dict": bad}, p)
        assert convert_main([str(p), str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_convert_averages_native_checkpoints_and_records_them(tmp_path, capsys):
    from icnet_ros.checkpoint import file_sha256

    from helpers import make_checkpoint

    a, b, c = (make_checkpoint(tmp_path / f"{n}.safetensors", seed=s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    dst = tmp_path / "soup.safetensors"
    assert convert_main([str(a), str(dst), "--average", str(b), str(c), "--no-aux"]) == 0
    assert "the average of 3 checkpoints" in capsys.readouterr().out
    soup, models = load_model(dst), [load_model(p) for p in (a, b, c)]
    states = [m.state_dict() for m in models]
    for k, v in soup.state_dict().items():
        if v.is_floating_point():  # weights and BN statistics: the mean of the three
            assert torch.allclose(v, sum(s[k] for s in states) / 3, rtol=1e-6, atol=1e-7), k
        else:  # BN batch counters: the first file's
            assert torch.equal(v, states[0][k]), k
    assert not any(k.startswith("auxiliary_head.") for k in soup.state_dict())
    record = soup.meta["provenance"]["exported"]
    assert record["from"] == "a.safetensors" and [r["from"] for r in record["averaged_with"]] == \
        ["b.safetensors", "c.safetensors"]
    assert [r["sha256"] for r in record["averaged_with"]] == [file_sha256(b), file_sha256(c)]
    # a file without the auxiliary heads can be the first (its tensors are averaged)
    assert convert_main([str(dst), str(tmp_path / "again.safetensors"), "--average", str(a)]) == 0
    capsys.readouterr()
    # averages of averages: a member's own history is named, not copied (copies nested 3.7x a level, and the third
    # level wrote a file no reader accepts); each member a copy of the level (a file given twice is refused)
    level = dst
    sizes = []
    for i in range(4):
        nxt = tmp_path / f"level{i}.safetensors"
        copies = [tmp_path / f"{level.stem}_{k}.safetensors" for k in (1, 2)]
        for copy in copies:
            shutil.copyfile(level, copy)
        assert convert_main([str(level), str(nxt), "--average", *map(str, copies)]) == 0
        sizes.append(len(json.dumps(read_metadata(nxt))))
        level = nxt
    capsys.readouterr()
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(growth) <= 1.2 * min(growth), sizes  # a record a level (its 'previous' chain), not a copy of all
    assert load_model(level).meta["provenance"]["exported"]["averaged_with"][0]["from"] == "level2_1.safetensors"
    again, first = load_model(tmp_path / "again.safetensors").state_dict(), soup.state_dict()
    assert all(torch.allclose(v, (first[k] + states[0][k]) / 2) for k, v in again.items() if v.is_floating_point())
    # the averaged model runs: outputs differ from each member's
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = soup.eval()(x)
        assert all(not torch.allclose(out, m.eval()(x)) for m in models)

    # refused with one line, nothing written: another architecture, other classes, missing heads, an mmseg file
    wide = make_checkpoint(tmp_path / "wide.safetensors", width=0.5)
    few = make_checkpoint(tmp_path / "few.safetensors", num_classes=5)
    # the same network trained on BGR frames with other statistics: its weights expect other inputs
    bgr = make_checkpoint(tmp_path / "bgr.safetensors", seed=3, normalization={
        "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395], "channel_order": "BGR"})
    cases = (([str(a), "--average", str(wide)], "its arch differs"),
             ([str(a), "--average", str(few)], "differs from the first checkpoint's"),
             ([str(a), "--average", str(bgr)], "its normalization differs from the first checkpoint's"),
             ([str(a), "--average", str(dst)], "lacks"),  # dst has no auxiliary heads
             ([str(a), "--average", str(tmp_path / "x.pth")], "only native .safetensors"),
             ([str(tmp_path / "m.pth"), "--average", str(b)], "--average takes native"))
    for args, message in cases:
        out = tmp_path / "bad.safetensors"
        assert convert_main([args[0], str(out), *args[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("icnet-convert: error:") and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0, 0.3, 0.6])
def test_mmseg_reference_config_is_the_same_network_or_refused(width):
    """The mmseg reference (icnet-bench --reference mmseg, the parity tests) has the same channel counts as ours, or
    is refused: mmseg derives its ResNet's stem and stage widths from one base count, we round each (at 0.6 the
    reference had 9.34M parameters against our 8.94M and was timed as if the same)."""
    from icnet_ros.models.resnet import ResNetV1c
    from icnet_ros.reference import mmseg_icnet_config

    if width in (0.3, 0.6):
        with pytest.raises(ValueError, match="no mmseg reference of the same size"):
            mmseg_icnet_config(18, 5, width)
        return
    backbone = mmseg_icnet_config(18, 5, width)["backbone"]["backbone_cfg"]
    ours = ResNetV1c(depth=18, width=width)
    assert backbone["stem_channels"] // 2 == ours.stem[0].out_channels
    assert backbone["stem_channels"] == ours.stem[6].out_channels
    for i in range(4):
        assert backbone["base_channels"] * 2 ** i == getattr(ours, f"layer{i + 1}")[0].conv1.out_channels


# ---------------------------------------------------------------------------------------------- review fixes
def test_convert_refuses_an_output_that_is_an_average_input_and_a_file_given_twice(tmp_path, capsys):
    """'icnet-convert a b --average b' replaced the input b by the average (only DST == SRC was refused), and a file
    given twice ('--average b b', or SRC again in --average, also spelt another way) was averaged in twice, weighing
    double, while the provenance said 'the average of 3'. Now both are one line, exit status 2, nothing written."""
    from helpers import make_checkpoint

    a, b = (make_checkpoint(tmp_path / f"{n}.safetensors", seed=s) for n, s in (("a", 0), ("b", 1)))
    before = {p: p.read_bytes() for p in (a, b)}
    same_b = tmp_path / "." / "b.safetensors"
    (tmp_path / "b_link.safetensors").symlink_to(b)
    out = tmp_path / "out.safetensors"
    cases = (([a, b, "--average", b], f"{b} is the --average file {b}: it would be replaced by the average; write "
                                      "the result to another file"),
             ([a, same_b, "--fp16", "--average", b], f"{same_b} is the --average file {b}: it would be replaced by "
                                                     "the average; write the result to another file"),
             ([a, out, "--average", b, b], f"--average {b}: the same file as {b} (given twice it would weigh double "
                                           "in the average); give each checkpoint once"),
             ([a, out, "--average", a], f"--average {a}: the same file as {a} (given twice it would weigh double in "
                                        "the average); give each checkpoint once"),
             ([a, out, "--average", b, tmp_path / "b_link.safetensors"],
              f"--average {tmp_path / 'b_link.safetensors'}: the same file as {b} (given twice it would weigh double "
              "in the average); give each checkpoint once"))
    for args, message in cases:
        assert convert_main(list(map(str, args))) == 2, args
        err = capsys.readouterr().err
        assert err == f"icnet-convert: error: {message}\n", err
        assert {p: p.read_bytes() for p in (a, b)} == before and not out.exists()
    assert convert_main([str(a), str(out), "--average", str(b)]) == 0  # each once: averaged
    assert "the average of 2 checkpoints" in capsys.readouterr().out


def _limit_file_size(nbytes):
    """In a child process: files stop growing at ``nbytes`` (EFBIG, 'File too large'; a full disk fails as ENOSPC),
    SIGXFSZ ignored."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
    return apply


def test_convert_that_cannot_write_its_output_is_one_line(tmp_path, capsys):
    """The output cannot be written: a file size limit (a full disk alike) was a SafetensorError traceback, an
    output under /proc a FileNotFoundError line naming /proc/x or a SafetensorError traceback. Now 'icnet-convert:
    error: cannot write DST: REASON', exit status 2, and no file (nor a temporary one) is left."""
    from helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "src.safetensors")
    out = tmp_path / "out" / "dst.safetensors"
    out.parent.mkdir()
    res = subprocess.run([sys.executable, "-m", "icnet_ros.tools.convert", str(src), str(out)], capture_output=True,
                         text=True, timeout=120, preexec_fn=_limit_file_size(64 * 1024))
    assert res.returncode == 2 and res.stderr == f"icnet-convert: error: cannot write {out}: File too large\n", \
        (res.returncode, res.stderr[-3000:])
    assert os.listdir(out.parent) == []
    for dst in ("/proc/icnet_convert_test/x.safetensors", "/proc/icnet_convert_test.safetensors"):
        assert convert_main([str(src), dst]) == 2
        err = capsys.readouterr().err
        assert err == f"icnet-convert: error: cannot write {dst}: No such file or directory\n", err


def test_convert_ctrl_c_is_one_line(tmp_path):
    """Ctrl-C (a real SIGINT, once torch's library is being loaded): before, a KeyboardInterrupt traceback (torch
    was imported with the module, before main). Now 'icnet-convert: interrupted', exit status 130, nothing
    written."""
    from helpers import make_checkpoint

    src = make_checkpoint(tmp_path / "src.safetensors")
    out = tmp_path / "out" / "dst.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.convert", str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    signal_once_torch_loads(proc, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "icnet-convert: interrupted\n", (proc.returncode, err[-3000:])
    assert not out.exists() and not out.parent.exists()


def test_fp16_refuses_a_finite_value_beyond_float16_before_writing(tmp_path, capsys):
    """A BatchNorm running_var of 1e5 (finite, above float16's 65504) became inf in an --fp16 copy, which no loader
    accepts ('holds NaN or infinite values'), exit status 0: now one line naming the tensor and the value, exit
    status 2 and no file; without --fp16 the same checkpoint converts."""
    from helpers import make_checkpoint

    from icnet_ros.checkpoint import save_checkpoint

    src = make_checkpoint(tmp_path / "src.safetensors", license="CC0 (test weights)")
    model = load_model(src)
    with torch.no_grad():
        model.backbone.backbone.stem[1].running_var[0] = 1e5
    save_checkpoint(model, src, model.meta)
    dst = tmp_path / "half.safetensors"
    assert convert_main([str(src), str(dst), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-convert: error: tensor backbone.backbone.stem.1.running_var holds values up to "
                          "100000") and "without --fp16" in err and err.count("\n") == 1, err
    assert not dst.exists() and not list(tmp_path.glob("*.tmp"))
    assert convert_main([str(src), str(dst)]) == 0
    assert load_model(dst).backbone.backbone.stem[1].running_var[0] == 1e5


def test_a_convolution_weight_that_is_not_4d_is_one_line(tmp_path, mmseg_r18_file, capsys):
    """infer_config reads the stem's and the classifier's first dimension for the width and the classes: a 0-d
    tensor there was an IndexError traceback."""
    src, _ = mmseg_r18_file
    state, _ = read_torch_checkpoint(src)
    for key in ("backbone.backbone.stem.0.weight", "decode_head.conv_seg.weight"):
        p = tmp_path / "scalar.pth"
        torch.save({"state_dict": dict(state, **{key: torch.tensor(1.0)})}, p)
        assert convert_main([str(p), str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"icnet-convert: error: {p}: {key} has shape [], not a convolution weight"), err
        assert err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()
