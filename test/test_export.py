"""ONNX export (icnet_ros.export, icnet-export): metadata round trip with the export record, the graph's interface,
refusal of truncated / non-ONNX / foreign files with one line, fp16 and fixed-batch exports, CLI flags and errors,
and a missing extra (the import really blocked, in a subprocess)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CAMVID, REPO, export_meta, make_checkpoint, require, tiny_onnx

from icnet_ros.checkpoint import CheckpointError, file_sha256, load_model, read_metadata
from icnet_ros.convert import export_native_checkpoint
from icnet_ros.export import check_export_size, export_onnx, profile_batch, read_onnx_metadata
from icnet_ros.tools.export import main as export_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = (128, 192)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export") / "r18.safetensors", license="CC0 (test weights)",
                           provenance={"source": "test", "iterations": 7})


@pytest.fixture(scope="module")
def exported(ckpt):
    """Exported through the CLI (so its flags and the recorded command are covered too)."""
    out = ckpt.with_name("r18.onnx")
    assert export_main([str(ckpt), "--format", "onnx", "--size", "128x192", "--batch", "2", "--output",
                        str(out)]) == 0
    return out


def one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_metadata_round_trip_with_export_record(ckpt, exported):
    src = load_model(ckpt).meta
    meta = read_onnx_metadata(exported)
    for key in ("classes", "palette", "dataset", "normalization", "license", "ignore_index"):
        assert meta[key] == src[key], key
    assert meta["arch"] == {**src["arch"], "aux_heads": False}
    assert meta["network_size"] == meta["input_size"] == list(SIZE)
    assert meta["provenance"]["source"] == "test" and meta["provenance"]["iterations"] == 7
    record = meta["provenance"]["exported"]
    assert record["format"] == "onnx" and record["size"] == list(SIZE) and record["batch"] == 2
    assert record["dynamic_batch"] is True and record["fp16"] is False
    assert record["from"] == "r18.safetensors" and record["sha256"] == file_sha256(ckpt)
    assert record["torch"] == torch.__version__ and isinstance(record["opset"], int) and record["date"]
    assert record["command"].startswith("icnet-export ") and "--size 128x192" in record["command"]
    assert profile_batch(meta) == 2
    # the same JSON as the onnx package reads it, and a model the ONNX checker accepts
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["icnet_ros"]) == meta
    assert model.opset_import[0].version == record["opset"]


def test_graph_interface(exported):
    model = onnx.load(str(exported), load_external_data=False)
    assert len(model.graph.initializer) > 0 and not os.path.exists(str(exported) + ".data")  # one file
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, *SIZE]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops  # folded
    # the factorized pyramid pooling's resize matrix is a constant of the graph, not recomputed per run
    assert "MatMul" in ops and not {"Pad", "Slice", "EyeLike"} & ops


def test_export_of_an_export_keeps_the_chain(tmp_path, ckpt):
    half = tmp_path / "half.safetensors"
    export_native_checkpoint(ckpt, half, fp16=True, include_aux=False)
    out = export_onnx(half, tmp_path / "half.onnx", size=(64, 96), dynamic_batch=False)
    record = read_onnx_metadata(out)["provenance"]["exported"]
    assert record["format"] == "onnx" and record["from"] == "half.safetensors"
    assert record["previous"]["from"] == "r18.safetensors" and record["previous"]["fp16"] is True
    assert "command" not in record  # only the CLI passes one
    assert profile_batch(read_onnx_metadata(out)) is None  # fixed batch
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def _foreign_onnx(path, props=None):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])])
    model = helper.make_model(graph)
    for k, v in (props or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("cut", [0.5, 0.99, "minus1", 20])
def test_truncated_onnx_refused(tmp_path, exported, cut):
    data = exported.read_bytes()
    n = {"minus1": len(data) - 1, 20: 20}.get(cut) or int(len(data) * cut)
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(bad)
    one_line_error(e, str(bad))


@pytest.mark.parametrize("kind", ["random", "empty", "safetensors", "text"])
def test_non_onnx_files_refused(tmp_path, ckpt, kind):
    bad = tmp_path / f"{kind}.onnx"
    if kind == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "safetensors":
        bad.write_bytes(ckpt.read_bytes())
    else:
        bad.write_text("<html>not a model</html>\n" * 10)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(bad)
    one_line_error(e, str(bad), "ONNX")


def test_foreign_onnx_refused(tmp_path, ckpt):
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(_foreign_onnx(tmp_path / "foreign.onnx", {"author": "someone"}))
    one_line_error(e, "without icnet_ros metadata", "icnet-export")
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(_foreign_onnx(tmp_path / "badjson.onnx", {"icnet_ros": "{not json"}))
    one_line_error(e, "not valid JSON")
    with pytest.raises(CheckpointError) as e:  # icnet_ros metadata from a checkpoint, but no network size
        meta = read_metadata(ckpt)
        read_onnx_metadata(_foreign_onnx(tmp_path / "nosize.onnx", {"icnet_ros": json.dumps(meta)}))
    one_line_error(e, "network_size")
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(tmp_path / "missing.onnx")
    one_line_error(e, "not found")


def test_export_sizes():
    assert check_export_size((352, 480)) == (352, 480)
    with pytest.raises(ValueError, match="multiples of 32.*nearest valid size: 352x480"):
        check_export_size((360, 480))
    with pytest.raises(ValueError, match="at least 64"):
        check_export_size((32, 480))


def test_fp16_fixed_batch_export_runs_in_onnxruntime(tmp_path, ckpt):
    out = export_onnx(ckpt, tmp_path / "fp16.onnx", size=SIZE, batch=2, dynamic_batch=False, fp16=True)
    meta = read_onnx_metadata(out)
    assert meta["provenance"]["exported"]["fp16"] is True
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 interface
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, *SIZE]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert not {"Pad", "Slice"} & {n.op_type for n in model.graph.node}  # fp16 resize matrices are constants too
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(ckpt)(x)
    from icnet_ros.backends.base import BackendOptions
    from icnet_ros.backends.onnxruntime import open_backend

    backend = open_backend(out, BackendOptions())
    assert backend.max_batch == 2 and backend.precision == "fp16" and backend.input_dtype == torch.float32
    got = backend(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.98  # fp16 rounding moves near-ties only
    with pytest.raises(ValueError, match="maximum batch 2"):
        backend(torch.zeros(3, 3, *SIZE))
    with pytest.raises(ValueError, match="fixed batch of 2, got 1"):
        backend(torch.zeros(1, 3, *SIZE))
    from icnet_ros.engine import Segmenter

    seg = Segmenter(out, device="cpu", warmup=False)  # asked fp32 (the default), runs the file's fp16
    assert seg.precision == "fp16" and " | fp16 | " in seg.describe()  # said fp32 (/diagnostics, icnet-bench)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_segmenter_serves_any_number_of_frames_from_a_fixed_batch_export(tmp_path, ckpt, fmt):
    """icnet-export --batch 2 --static-batch: the Segmenter pads a short batch (1 frame, or the third of 3) with
    copies of its last frame and keeps the real rows; warm-up (one frame) works; labels as the dynamic export's."""
    from icnet_ros.engine import Segmenter

    if fmt == "openvino":
        pytest.importorskip("openvino")
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    fixed, dynamic = tmp_path / f"fixed{suffix}", tmp_path / f"dynamic{suffix}"
    size = f"{SIZE[0]}x{SIZE[1]}"
    assert export_main([str(ckpt), "--format", fmt, "--size", size, "--batch", "2", "--static-batch",
                        "--output", str(fixed)]) == 0
    assert export_main([str(ckpt), "--format", fmt, "--size", size, "--output", str(dynamic)]) == 0
    seg, ref = Segmenter(fixed, device="cpu"), Segmenter(dynamic, device="cpu", warmup=False)
    assert seg.backend.max_batch == 2 and seg.backend.exact_batch and not ref.backend.exact_batch
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    for batch in ([frames[0]], frames, frames[1:]):
        got, want = seg.segment(batch), ref.segment(batch)
        assert len(got) == len(batch)
        for a, b in zip(got, want):
            assert (a.label == b.label).mean() >= 0.999


def test_cli_errors(tmp_path, ckpt, capsys):
    out = str(tmp_path / "x.onnx")
    cases = [
        (["--size", "360x480"], "multiples of 32"),
        (["--size", "360"], "HEIGHTxWIDTH"),
        (["--size", "128x192", "--int8", "--calib", str(tmp_path)], "--format openvino"),
        (["--size", "128x192", "--batch", "0"], "--batch"),
    ]
    for extra, fragment in cases:
        assert export_main([str(ckpt), "--format", "onnx", "--output", out, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("icnet-export: error:") and fragment in err[-1], err
    for model, fragment in ((tmp_path / "none.safetensors", "not found"), (tmp_path / "m.pth", "icnet-convert")):
        assert export_main([str(model), "--format", "onnx", "--size", "128x192", "--output", out]) == 2
        assert fragment in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert export_main([str(bad), "--format", "onnx", "--size", "128x192", "--output", out]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert export_main([str(ckpt), "--format", "onnx", "--size", "128x192", "--output", str(tmp_path / "x.bin")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_opset_is_honoured_or_refused_never_substituted(tmp_path, ckpt, capsys):
    """An opset the exporter cannot write (below its onnxscript opset 18: ICNet's Pad has no down-converter) is one
    line naming the opsets it writes, before anything runs, and no file; one it can write is the file's opset."""
    from icnet_ros.export import supported_opsets

    lowest, highest = supported_opsets()
    out = tmp_path / "o.onnx"
    for bad in (13, lowest - 1, highest + 1):
        assert export_main([str(ckpt), "--format", "onnx", "--size", "128x192", "--opset", str(bad), "--output",
                            str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"icnet-export: error: --opset {bad}:") and f"opsets {lowest} to {highest}" in err
    assert not out.exists()
    with pytest.raises(ValueError) as excinfo:
        export_onnx(ckpt, out, SIZE, opset=13)
    one_line_error(excinfo, "opset 13", f"{lowest} to {highest}")
    assert export_main([str(ckpt), "--format", "onnx", "--size", "128x192", "--opset", "19", "--output",
                        str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert onnx.load(str(out)).opset_import[0].version == 19
    assert read_onnx_metadata(out)["provenance"]["exported"]["opset"] == 19


def test_cli_checks_the_output_path_before_exporting(tmp_path, ckpt, capsys):
    """A folder named like the output, or a file where its folder should be: one line at once, before the export
    (it failed only after the whole export, ~30 s for the default model)."""
    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "afile").write_bytes(b"")
    (tmp_path / "taken.xml").mkdir()
    for fmt, out, reason in (("onnx", tmp_path / "taken.onnx", "is a folder, not a file"),
                             ("onnx", tmp_path / "afile" / "e.onnx", f"{tmp_path / 'afile'} is a file, not a folder"),
                             ("openvino", tmp_path / "taken", "is a folder, not a file")):
        assert export_main([str(ckpt), "--format", fmt, "--size", "128x192", "--output", str(out)]) == 2
        err = capsys.readouterr().err  # one line: the export's own first line never came
        assert err.startswith("icnet-export: error: --output ") and reason in err and err.count("\n") == 1, err



def test_an_upper_case_suffix_is_written_as_named(tmp_path, ckpt):
    """--output m.ONNX / m.XML passed the checks (made on that name, suffix in any case) but another file was
    written: m.onnx, or m.XML.xml + m.XML.bin; a folder in their way was found only after the export."""
    from icnet_ros.engine import Segmenter

    pytest.importorskip("openvino")
    for fmt, name, files in (("onnx", "m.ONNX", {"m.ONNX"}), ("openvino", "v.XML", {"v.XML", "v.bin"})):
        folder = tmp_path / fmt
        folder.mkdir()
        assert export_main([str(ckpt), "--format", fmt, "--size", "64x96", "--output", str(folder / name)]) == 0
        assert {p.name for p in folder.iterdir()} == files
        assert Segmenter(folder / name, device="cpu", warmup=False).backend.name == fmt.replace("onnx", "onnxruntime")

def test_exported_files_by_a_home_relative_path_and_with_a_backend_that_cannot_read_them(tmp_path, ckpt, capsys,
                                                                                          monkeypatch):
    """'~/m.onnx' (model:=, --model, a params file: nothing expands it) was 'model file not found' for exports
    while '~/m.safetensors' loaded. An explicit backend given a file type it does not read (backend torch after the
    model became an .onnx export) called the valid file corrupt ('not a readable safetensors file'): now one line
    naming the backends that run it. ICNET_ROS_DEFAULT_MODEL naming an export: the same. An OpenVINO --output
    named .onnx was written as x.onnx.xml + x.onnx.bin: refused."""
    from icnet_ros.checkpoint import default_model_path
    from icnet_ros.engine import Segmenter

    pytest.importorskip("openvino")
    monkeypatch.setenv("HOME", str(tmp_path))
    for fmt, name in (("onnx", "m.onnx"), ("openvino", "v.xml")):
        assert export_main([str(ckpt), "--format", fmt, "--size", "64x96", "--output", str(tmp_path / name)]) == 0
    frame = np.zeros((64, 96, 3), np.uint8)
    for name, backend in (("m.onnx", "onnxruntime"), ("v.xml", "openvino"), ("m.onnx", "openvino")):
        seg = Segmenter(f"~/{name}", backend=backend, device="cpu", warmup=False)
        assert seg.backend.name == backend and seg.segment([frame])[0].label.shape == (64, 96)
    for name, backend, runs_on in (("m.onnx", "torch", "onnxruntime or openvino or tensorrt"),
                                   ("v.xml", "onnxruntime", "openvino"), ("v.xml", "tensorrt", "openvino")):
        with pytest.raises(CheckpointError) as e:
            Segmenter(tmp_path / name, backend=backend, device="cpu", warmup=False)
        assert f"backend {backend!r} runs" in str(e.value) and f"runs on {runs_on}" in str(e.value) \
            and "corrupt" not in str(e.value) and "not a complete" not in str(e.value), str(e.value)
    monkeypatch.setenv("ICNET_ROS_DEFAULT_MODEL", str(tmp_path / "m.onnx"))
    with pytest.raises(CheckpointError, match="ICNET_ROS_DEFAULT_MODEL=.*m.onnx: the default model must be a "
                                              r"\.safetensors checkpoint"):
        default_model_path()
    monkeypatch.delenv("ICNET_ROS_DEFAULT_MODEL")
    capsys.readouterr()
    assert export_main([str(ckpt), "--format", "openvino", "--size", "64x96", "--output",
                        str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icnet-export: error: --output ") and ".onnx is another format's" in err, err
    assert not list(tmp_path.glob("x.*"))


def test_ctrl_c_during_the_export_is_one_line_and_leaves_no_file(tmp_path, ckpt):
    """SIGINT once the export started (its first line printed): 'icnet-export: interrupted', exit status 130, no
    output and no temporary file. Before: a KeyboardInterrupt traceback from inside torch (exit 1)."""
    out = tmp_path / "e.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "icnet_ros.tools.export", str(ckpt), "--format", "onnx", "--size",
                             "128x192", "--output", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.readline()
    assert first.startswith("icnet-export: ") and "->" in first, first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export")]
    assert proc.returncode == 130 and lines == ["icnet-export: interrupted"] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_model_that_cannot_be_written_is_one_line_and_no_file(tmp_path, ckpt, capsys, fmt):
    """The disk fills up while the model is written (a real write failure: a file size limit, EFBIG). Before:
    OpenVINO's 'RuntimeError: basic_ios::clear: iostream error' traceback, and for ONNX 'error: [Errno 27] File
    too large' naming no file. Now 'cannot write FILE: REASON', exit status 2, no file or temporary file left;
    the same for a place OpenVINO cannot open its files in (/proc: 'Can't open bin file', a traceback before;
    now refused before the export)."""
    from helpers import file_size_limit

    if fmt == "openvino":
        pytest.importorskip("openvino")
    folder = tmp_path / "out"
    out = folder / f"m.{'xml' if fmt == 'openvino' else 'onnx'}"
    with file_size_limit(64 * 1024):
        rc = export_main([str(ckpt), "--format", fmt, "--size", "128x192", "--output", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export: error")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    expected = f"icnet-export: error: cannot write {out}: "
    assert errors[0] == expected + "File too large" if fmt == "onnx" else errors[0].startswith(expected), errors
    assert list(folder.iterdir()) == []
    if fmt == "openvino":
        proc_out = "/proc/icnet_test_export.xml"
        assert export_main([str(ckpt), "--format", fmt, "--size", "128x192", "--output", proc_out]) == 2
        err = capsys.readouterr().err
        errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export: error")]
        # (refused before the export since the output check creates a file in the folder, as the export would)
        assert errors == [f"icnet-export: error: --output {proc_out}: cannot create a file in /proc: No such file or "
                          "directory"], err
        assert "Traceback" not in err


def test_usage_shows_the_one_size_export_takes(capsys):
    """--size takes one size (HxW, or H W): the usage said '--size HxW [HxW ...]' and a second size was refused."""
    from icnet_ros.tools.export import build_parser

    usage = " ".join(build_parser().format_usage().split())
    assert "--size HxW " in usage and "[HxW ...]" not in usage, usage
    assert export_main(["m.safetensors", "--format", "onnx", "--size", "352x480", "544x736", "--output",
                        "m.onnx"]) == 2
    assert "--size takes one size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_tensorrt_without_gpu_is_one_line(tmp_path, ckpt, capsys):
    out = tmp_path / "t.onnx"
    assert export_main([str(ckpt), "--format", "tensorrt", "--size", "128x192", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "icnet_ros[tensorrt]" in err or "CUDA is not available" in err, err
    assert not out.exists()  # refused before exporting


def test_cli_missing_extra(tmp_path, ckpt):
    """The runtime package really cannot be imported (sys.modules entry None blocks it) in a fresh interpreter."""
    out, blocked = tmp_path / "x.onnx", "onnx"
    code = (f"import sys; sys.modules[{blocked!r}] = None; from icnet_ros.tools.export import main; "
            f"sys.exit(main([{str(ckpt)!r}, '--format', 'onnx', '--size', '128x192', '--output', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("icnet-export: error:") and f"'{blocked}'" in last and "icnet_ros[onnx]" in last, last
    assert not out.exists()


def test_cli_int8_without_nncf_is_one_line(tmp_path, ckpt):
    """OpenVINO installed without NNCF (a partial install): --int8 ended in a ModuleNotFoundError traceback after
    the model was loaded. Now one line naming the extra, exit status 2, no file."""
    pytest.importorskip("openvino")
    out, calib = tmp_path / "m.xml", _calib_folder(tmp_path, count=1)
    code = (f"import sys; sys.modules['nncf'] = None; from icnet_ros.tools.export import main; "
            f"sys.exit(main([{str(ckpt)!r}, '--format', 'openvino', '--int8', '--calib', {str(calib)!r}, "
            f"'--size', '128x192', '--output', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("icnet-export: error:") and "'nncf'" in last and "icnet_ros[openvino]" in last, last
    assert not list(tmp_path.glob("m.*"))


def test_cli_openvino_delegates(tmp_path, ckpt, capsys):
    """--format openvino runs the OpenVINO exporter (real OpenVINO) with the CLI's size and batch, and records the
    command line in the provenance."""
    pytest.importorskip("openvino")
    from icnet_ros.backends.openvino import read_openvino_metadata

    out = tmp_path / "r18.xml"
    assert export_main([str(ckpt), "--format", "openvino", "--size", "128x192", "--static-batch", "--batch", "2",
                        "--output", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".bin").is_file()
    record = read_openvino_metadata(out)["provenance"]["exported"]
    assert record["format"] == "openvino" and record["size"] == list(SIZE) and record["batch"] == 2
    # the command line is recorded, as for ONNX (it was None)
    assert record["command"] == f"icnet-export {ckpt} --format openvino --size 128x192 --static-batch --batch 2 " \
                                f"--output {out}"
    assert export_main([str(ckpt), "--format", "openvino", "--size", "128x192", "--int8", "--output",
                        str(tmp_path / "q.xml")]) == 2
    assert "--calib DIR" in capsys.readouterr().err


def test_network_size_is_bounded(tmp_path, ckpt):
    """A model file cannot set a network input beyond MAX_UPSCALED_PIXELS (a 1.2 KB .onnx at 12000 x 12000 cost
    28 s and 6.3 GB before the first frame)."""
    from icnet_ros.sizes import MAX_UPSCALED_PIXELS

    assert read_onnx_metadata(tiny_onnx(tmp_path / "ok.onnx", export_meta(ckpt, (4096, 4096)), (4096, 4096)))
    for size in ((12000, 12000), (4128, 4096), (64, 10 ** 9)):
        path = tiny_onnx(tmp_path / "big.onnx", export_meta(ckpt, size, input_size=[64, 64]), size)
        with pytest.raises(CheckpointError) as e:
            read_onnx_metadata(path)
        one_line_error(e, str(path), "invalid network_size", f"at most {MAX_UPSCALED_PIXELS} pixels")
    path = tiny_onnx(tmp_path / "bool.onnx", export_meta(ckpt, (64, 64), network_size=[True, 64]))
    with pytest.raises(CheckpointError, match="invalid network_size"):
        read_onnx_metadata(path)
    with pytest.raises(ValueError, match=f"more than {MAX_UPSCALED_PIXELS} pixels"):
        check_export_size((4128, 4096))


def test_metadata_scan_is_bounded(tmp_path, ckpt, exported, monkeypatch):
    """The top-level walk reads the file in chunks and stops after MAX_TOP_LEVEL_FIELDS fields: a valid .onnx padded
    with millions of 2-byte ir_version fields (protobuf keeps the last) took 23.8 s per 20 MiB, one read(1) per byte.
    Counted: varints decoded and file reads."""
    import icnet_ros.export as export_module

    limit = getattr(export_module, "MAX_TOP_LEVEL_FIELDS", 4096)
    varints, reads = [0], [0]
    decode = export_module._read_varint

    def counting(*args):
        varints[0] += 1
        return decode(*args)

    monkeypatch.setattr(export_module, "_read_varint", counting)
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, *args):
            reads[0] += 1
            return self._f.read(*args)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    monkeypatch.setattr("builtins.open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    # a real export: its structure is walked (external data is looked for), in chunks, skipping the tensor data
    assert read_onnx_metadata(exported)["network_size"] == list(SIZE)
    assert varints[0] < 20_000 and reads[0] <= exported.stat().st_size // export_module._CHUNK + 2, (varints, reads)
    # 400 KB of tiny fields after a valid model: refused after MAX_TOP_LEVEL_FIELDS fields, in a few chunk reads
    varints[0] = reads[0] = 0
    padded = tiny_onnx(tmp_path / "padded.onnx", export_meta(ckpt), suffix=b"\x08\x08" * 200_000)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(padded)
    one_line_error(e, str(padded), f"more than {limit} top-level fields")
    assert varints[0] <= 2 * limit + 200 and reads[0] <= 4, (varints, reads)  # (+ the tiny graph's walk)
    # fewer extra fields than the limit are read as before
    fine = tiny_onnx(tmp_path / "fine.onnx", export_meta(ckpt), suffix=b"\x08\x08" * 100)
    assert read_onnx_metadata(fine)["network_size"] == [64, 64]
    # the metadata entries together are bounded too (each was, alone)
    meta = json.dumps(export_meta(ckpt))
    entry = b"\x0a\x01x\x12" + bytes([0x80, 0x80, 0x80, 0x04]) + b" " * (8 << 20)  # key "x", 8 MiB value
    field = b"\x72" + _varint(len(entry)) + entry  # field 14, wire type 2
    with pytest.raises(CheckpointError, match=f"more than {export_module.MAX_METADATA_BYTES} bytes of metadata"):
        read_onnx_metadata(tiny_onnx(tmp_path / "meta.onnx", meta, suffix=field * 3))
    # the walk of the graph too: its fields are counted
    monkeypatch.setattr(export_module, "MAX_GRAPH_FIELDS", 50)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(exported)
    one_line_error(e, str(exported), "more than 50 fields in the graph")


def test_metadata_text_is_bounded_before_it_is_parsed(tmp_path, ckpt, monkeypatch):
    """Metadata JSON longer than a checkpoint's may be (1 MiB) is refused before it is parsed: 15 MiB of it took 7 s
    and 600 MiB to parse, and was refused only then."""
    import icnet_ros.export as export_module
    from icnet_ros.checkpoint import MAX_META_BYTES

    meta = export_meta(ckpt)
    meta["provenance"]["notes"] = [{}] * 300_000
    text = json.dumps(meta)
    assert MAX_META_BYTES < len(text) < export_module.MAX_METADATA_BYTES
    path = tiny_onnx(tmp_path / "big.onnx", text)

    def no_parse(*args, **kwargs):
        raise AssertionError("the metadata was parsed")

    monkeypatch.setattr(export_module.json, "loads", no_parse)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(path)
    one_line_error(e, str(path), f"icnet_ros metadata of {len(text)} bytes (at most {MAX_META_BYTES}")


def _external(tensor, folder, name="weights.bin"):
    """Store ``tensor``'s data in the file ``name`` of ``folder`` (ONNX external data) instead of in the model."""
    from onnx import TensorProto

    (folder / name).write_bytes(tensor.raw_data)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", name), ("offset", "0"), ("length", str(len(tensor.raw_data)))):
        tensor.external_data.add(key=key, value=value)
    tensor.ClearField("raw_data")


@pytest.mark.parametrize("where", ["initializer", "Constant node", "Constant node in a subgraph",
                                   "Constant node in a model-local function", "sparse initializer",
                                   "sparse initializer's indices", "tensor in an attribute list"])
def test_a_tensor_stored_in_another_file_is_refused(tmp_path, ckpt, where):
    """ONNX external data: ONNX Runtime and OpenVINO read any file in the model's folder that a tensor names (a
    model next to ~/.ssh/id_rsa read it, and its graph published the bytes as labels). icnet-export writes
    self-contained files; a tensor with external data anywhere in the graph is refused, with one line, before a
    runtime sees the file."""
    from onnx import TensorProto, helper

    from icnet_ros.backends.base import BackendOptions
    from icnet_ros.backends.onnxruntime import open_backend

    model = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx", export_meta(ckpt))))
    weight = model.graph.initializer[0]
    _external(weight, tmp_path)
    if where == "tensor in an attribute list":  # W stored in the file; a copy in another file, in a node's list
        from onnx import numpy_helper

        stored = np.fromfile(tmp_path / "weights.bin", np.float32).reshape(list(weight.dims))
        external = TensorProto()
        external.CopyFrom(weight)
        del model.graph.initializer[:]
        model.graph.initializer.append(numpy_helper.from_array(stored, "W"))
        model.graph.node.append(helper.make_node("Identity", ["W"], ["W_copy"], copies=[external]))
    elif where == "sparse initializer":  # W's values (all of them, dense) in a sparse initializer
        del model.graph.initializer[:]
        shape = list(weight.dims)
        weight.dims[:] = [int(np.prod(shape))]
        indices = helper.make_tensor("W_indices", TensorProto.INT64, [weight.dims[0]],
                                     list(range(weight.dims[0])))
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(weight, indices, shape))
    elif where == "sparse initializer's indices":  # W's values in the file, their indices in another one
        from onnx import numpy_helper

        del model.graph.initializer[:]
        shape = list(weight.dims)
        values = numpy_helper.from_array(np.fromfile(tmp_path / "weights.bin", np.float32), "W")
        indices = numpy_helper.from_array(np.arange(int(np.prod(shape)), dtype=np.int64), "W_indices")
        _external(indices, tmp_path)  # (weights.bin now holds the indices)
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, shape))
    elif where != "initializer":  # W from a Constant node instead of an initializer
        del model.graph.initializer[:]
        constant = helper.make_node("Constant", [], ["W"], value=weight)
        if where == "Constant node":
            model.graph.node.insert(0, constant)
        elif where.endswith("function"):  # W from a function of the model's own (ONNX Runtime runs it)
            model.functions.append(helper.make_function("local", "GetW", [], ["W"], [constant],
                                                        [helper.make_opsetid("", 17)]))
            model.opset_import.append(helper.make_opsetid("local", 1))
            model.graph.node.insert(0, helper.make_node("GetW", [], ["W"], domain="local"))
        else:  # inside the then-branch of an If whose output is W
            branch = helper.make_graph([constant], "then", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT,
                                                                                              None)])
            cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
            model.graph.initializer.append(cond)
            model.graph.node.insert(0, helper.make_node("If", ["cond"], ["W"], then_branch=branch,
                                                        else_branch=branch))
    path = tmp_path / "road.onnx"
    onnx.save(model, str(path))
    opened = [lambda: read_onnx_metadata(path), lambda: open_backend(path, BackendOptions())]
    try:
        from icnet_ros.backends.openvino import open_backend as openvino_backend

        opened.append(lambda: openvino_backend(path, BackendOptions()))
    except ImportError:
        pass
    for open_model in opened:
        with pytest.raises(CheckpointError) as e:
            open_model()
        one_line_error(e, str(path), f"tensor {'W_indices' if 'indices' in where else 'W'!r} is not stored in the "
                       "file: its data is in another file ('weights.bin'); a model must not read other files")


def test_a_tensor_hidden_from_the_walk_by_protobufs_32_bit_arithmetic_is_refused(tmp_path, ckpt):
    """protobuf reads a field tag as 32 bits and an enum as an int32; the walk read both as 64-bit numbers. A tensor
    with external data under the tag AA 80 80 80 10 (protobuf: field 5, a graph's initializer; the walk: field
    2**29 + 5, skipped) passed it, and ONNX Runtime and OpenVINO then read a file beside the model (its bytes came
    out as the logits); likewise a data_location of 2**32 + 1 (EXTERNAL to protobuf). Now both are refused."""
    from onnx import TensorProto

    from icnet_ros.backends.base import BackendOptions
    from icnet_ros.backends.onnxruntime import open_backend

    (tmp_path / "secret.bin").write_bytes(bytes(11 * 3 * 4))
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[11, 3, 1, 1], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", str(11 * 3 * 4))):
        weight.external_data.add(key=key, value=value)
    tensor = weight.SerializeToString()
    hidden = bytes([5 << 3 | 2 | 0x80, 0x80, 0x80, 0x80, 0x10]) + _varint(len(tensor)) + tensor
    path = tiny_onnx(tmp_path / "tag.onnx", export_meta(ckpt), suffix=_varint(7 << 3 | 2) + _varint(len(hidden))
                     + hidden)  # a second graph field: protobuf merges it into the first
    for open_model in (lambda: read_onnx_metadata(path), lambda: open_backend(path, BackendOptions())):
        with pytest.raises(CheckpointError) as e:
            open_model()
        one_line_error(e, str(path), "invalid field tag (more than 32 bits) before byte")
    # a tensor under its plain tag whose data_location (its only sign of external data) is written as 2**32 + 1
    bare = TensorProto(name="V", data_type=TensorProto.FLOAT, dims=[1]).SerializeToString()
    bare += _varint(14 << 3) + _varint(2**32 + 1)
    plain = _varint(5 << 3 | 2) + _varint(len(bare)) + bare
    path = tiny_onnx(tmp_path / "enum.onnx", export_meta(ckpt),
                     suffix=_varint(7 << 3 | 2) + _varint(len(plain)) + plain)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(path)
    one_line_error(e, str(path), "tensor 'V' is not stored in the file: its data_location is EXTERNAL")


def test_graph_nesting_is_bounded(tmp_path, ckpt):
    """Subgraphs nested deeper than MAX_GRAPH_NESTING (graph > node > attribute > graph ...) are refused with one
    line, not walked into Python's recursion limit."""
    import icnet_ros.export as export_module

    def field(number, payload):
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    graph = b""
    for _ in range(export_module.MAX_GRAPH_NESTING + 5):
        graph = field(1, field(5, field(6, graph)))  # a node with a graph attribute holding the next graph
    path = tiny_onnx(tmp_path / "deep.onnx", export_meta(ckpt), suffix=field(7, graph))
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(path)
    one_line_error(e, str(path), f"messages nested more than {export_module.MAX_GRAPH_NESTING} deep")


def test_a_negative_integer_attribute_across_a_read_chunk_is_read(tmp_path, ckpt):
    """A negative integer attribute (LogSoftmax axis=-3) is a 10-byte varint in protobuf; the walk reads the file in
    chunks of 64 KiB and must read all 10 bytes of a varint that starts 9 bytes before a chunk's end (a doc_string
    places it there) instead of calling the file truncated. The model is real: ONNX Runtime opens it too."""
    from onnx import helper

    import icnet_ros.export as export_module
    from icnet_ros.backends.base import BackendOptions
    from icnet_ros.backends.onnxruntime import open_backend

    model = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx", export_meta(ckpt))))
    model.graph.node[-1].output[0] = "scores"
    model.graph.node.append(helper.make_node("LogSoftmax", ["scores"], ["logits"], axis=-3))  # over the classes
    minus3 = _varint(2**64 - 3)
    assert len(minus3) == 10
    path, want = tmp_path / "axis.onnx", export_module._CHUNK - 9
    model.doc_string = "x" * 60_000
    at = model.SerializeToString().index(minus3)
    model.doc_string = "x" * (60_000 + want - at)
    data = model.SerializeToString()
    assert data.index(minus3) == want
    path.write_bytes(data)
    assert read_onnx_metadata(path)["network_size"] == [64, 64]
    backend = open_backend(path, BackendOptions())
    try:
        logits = backend(torch.zeros(1, 3, 64, 64))
        assert torch.allclose(logits.exp().sum(dim=1), torch.ones(1, 8, 8), atol=1e-5)
    finally:
        backend.close()


def _varint(n):
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def test_export_record_readers_tolerate_wrong_types(ckpt):
    """provenance as [] / a string / {"exported": [1]} raised AttributeError out of Segmenter(); the readers now treat
    a wrong type as absent, and the export batch (TensorRT's profile maximum) must be a positive integer, its
    profile at most 64 (an earlier version's export of --batch 100 still loads)."""
    from icnet_ros.backends.tensorrt import _engine_record
    from icnet_ros.export import exported_meta

    limit = 64
    for provenance in ([], ["x"], "exported", 7, None, {"exported": [1]}, {"exported": "onnx"}):
        meta = {"provenance": provenance}
        assert profile_batch(meta) == 1 and _engine_record(meta) == {}
    assert profile_batch({"provenance": {"exported": {"batch": 8, "dynamic_batch": "no"}}}) == 8  # not a bool
    assert profile_batch({"provenance": {"exported": {"batch": 8, "dynamic_batch": False}}}) is None
    assert profile_batch({"provenance": {"exported": {"batch": limit}}}) == limit
    assert profile_batch({"provenance": {"exported": {"batch": 10 ** 6}}}) == limit
    for batch in ("many", 0, -3, 2.0, True, [2]):
        with pytest.raises(CheckpointError, match="invalid export batch in metadata.*need a positive integer"):
            profile_batch({"provenance": {"exported": {"batch": batch, "dynamic_batch": True}}})
    # refused at read, for every backend (validate_export_meta)
    meta = read_metadata(ckpt)
    meta["network_size"] = list(SIZE)
    meta["provenance"]["exported"] = {"format": "onnx", "batch": "many", "dynamic_batch": True}
    from icnet_ros.export import parse_export_meta

    with pytest.raises(CheckpointError) as e:
        parse_export_meta(json.dumps(meta), "m.onnx")
    one_line_error(e, "m.onnx: invalid export batch in metadata: 'many'")
    meta["provenance"]["exported"]["batch"] = 100  # an export of an earlier version with --batch 100
    assert profile_batch(parse_export_meta(json.dumps(meta), "m.onnx")) == limit
    # an export of a model whose provenance is not an object records a fresh one
    meta = read_metadata(ckpt)
    meta["provenance"] = ["x"]
    out = exported_meta(meta, {"format": "onnx", "size": list(SIZE), "batch": 2, "dynamic_batch": True})
    assert out["provenance"]["exported"]["batch"] == 2 and profile_batch(out) == 2
    with pytest.raises(ValueError, match=f"batch must be 1 to {limit}"):
        export_onnx(ckpt, ckpt.with_name("never.onnx"), size=SIZE, batch=limit + 1)
    assert not ckpt.with_name("never.onnx").exists()


def test_metadata_with_an_integer_past_pythons_digit_limit_is_one_line_naming_the_file(tmp_path, ckpt):
    """An integer of 5000 digits in an export's metadata: json raised a bare ValueError (Python's 4300-digit
    conversion limit) that named no file and suggested sys.set_int_max_str_digits."""
    text = json.dumps(export_meta(ckpt)).replace('"provenance": {', '"big": ' + "9" * 5000 + ', "provenance": {', 1)
    path = tiny_onnx(tmp_path / "bigint.onnx", text)
    with pytest.raises(CheckpointError) as e:
        read_onnx_metadata(path)
    one_line_error(e, str(path), "icnet_ros metadata cannot be read: Exceeds the limit (4300 digits)")
    assert "set_int_max_str_digits" not in str(e.value)


def test_deeply_nested_metadata_refused(tmp_path, ckpt):
    """100000 nested arrays in the metadata raised RecursionError out of read_onnx_metadata (only JSONDecodeError was
    caught); nesting json accepts (hundreds of levels) broke later deep copies. Both are a one-line CheckpointError
    now, for the .onnx reader and the TensorRT side file alike; a long chain of real export records still reads."""
    from icnet_ros.backends.tensorrt import read_engine_metadata

    raw = json.dumps(export_meta(ckpt))
    for depth, match in ((100_000, "nested too deeply to parse"), (400, "nested deeper than 64 levels"),
                         (70, "nested deeper than 64 levels")):
        text = raw.replace('"provenance": {', '"deep": ' + "[" * depth + "]" * depth + ', "provenance": {', 1)
        path = tiny_onnx(tmp_path / f"deep{depth}.onnx", text)
        with pytest.raises(CheckpointError) as e:
            read_onnx_metadata(path)
        one_line_error(e, str(path), match)
        engine = tmp_path / f"deep{depth}.engine"
        engine.write_bytes(b"engine")
        (tmp_path / f"deep{depth}.engine.json").write_text(text)
        with pytest.raises(CheckpointError, match=match):
            read_engine_metadata(engine)
    meta = export_meta(ckpt)
    for i in range(30):  # 30 exports of exports
        meta["provenance"]["exported"] = {"format": "onnx", "batch": 1, "previous": meta["provenance"]["exported"]}
    assert read_onnx_metadata(tiny_onnx(tmp_path / "chain.onnx", meta))["network_size"] == [64, 64]


def _calib_folder(tmp_path, count=3, corrupt=False):
    """``count`` CamVid train frames (links), and with ``corrupt`` a text file saved as zz_notes.jpg after them."""
    frames = sorted((require(CAMVID / "train") / "images").iterdir())[:count]
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in frames:
        (calib / f.name).symlink_to(f)
    if corrupt:
        (calib / "zz_notes.jpg").write_text("not an image, saved as .jpg")
    return calib


def test_int8_an_unreadable_calibration_image_fails_before_calibrating(tmp_path, ckpt, capsys, monkeypatch):
    """A text file saved as .jpg among the calibration images. Before: NNCF met it inside its calibration loop and
    the export failed only after calibrating. Now every chosen image is decoded first: one line naming the file,
    exit status 2, no calibration run, no output file."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from icnet_ros.backends import openvino as ov_backend

    def no_calibration(*args, **kwargs):
        raise AssertionError("the calibration ran")

    monkeypatch.setattr(ov_backend, "quantize_int8", no_calibration)
    calib = _calib_folder(tmp_path, corrupt=True)
    out = tmp_path / "out" / "q.xml"
    rc = export_main([str(ckpt), "--format", "openvino", "--size", "128x192", "--int8", "--calib", str(calib),
                      "--calib-count", "4", "--output", str(out)])
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export: error")]
    assert rc == 2 and len(errors) == 1 and str(calib / "zz_notes.jpg") in errors[0], captured.err
    assert "Traceback" not in captured.err and "Statistics collection" not in captured.err + captured.out
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_int8_progress_goes_to_stderr_and_stdout_is_the_result_line(tmp_path, ckpt):
    """icnet-export --int8 with progress: NNCF's progress bars went to stdout ahead of the result line. Now they go
    to stderr, and stdout carries the one result line only."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    calib = _calib_folder(tmp_path, count=2)
    out = tmp_path / "q.xml"
    proc = subprocess.run([sys.executable, "-m", "icnet_ros.tools.export", str(ckpt), "--format", "openvino",
                           "--size", "64x96", "--int8", "--calib", str(calib), "--calib-count", "2", "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Statistics collection" not in proc.stdout, proc.stdout
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith(str(out)), proc.stdout
    assert "Statistics collection" in proc.stderr


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "tensorrt"])
def test_an_output_folder_is_refused_before_anything_runs(tmp_path, ckpt, capsys, fmt):
    """--output models/ (a path separator at the end) or the name of an existing folder. Before, for openvino:
    models/.xml checked, models.xml written beside an empty models/ folder (with a folder models.bin in the way,
    a raw '[Errno 21] Is a directory' after the whole export). Now one line, exit status 2, nothing created."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
    ext = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".onnx"}[fmt]
    (tmp_path / f"folder{ext}").mkdir()
    (tmp_path / "models.bin").mkdir()
    for output, words in ((str(tmp_path / "models") + os.sep, "ends in a path separator"),
                          (str(tmp_path / f"folder{ext}"), "is a folder, not a file")):
        before = sorted(tmp_path.rglob("*"))
        rc = export_main([str(ckpt), "--format", fmt, "--size", "128x192", "--output", output])
        err = capsys.readouterr().err
        errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export: error")]
        assert rc == 2 and errors == [f"icnet-export: error: --output {output}: {words}" + errors[0].split(words)[1]]
        assert "Traceback" not in err and "->" not in err, err
        assert sorted(tmp_path.rglob("*")) == before


def test_a_rename_that_fails_is_cannot_write(tmp_path):
    """The last step of a write (the rename over the output) failing, e.g. a folder of that name appearing meanwhile:
    'cannot write FILE: REASON', as the other write errors (before: a raw '[Errno 21] Is a directory' line)."""
    from icnet_ros.export import replace_file
    from icnet_ros.video import temporary_file

    final = tmp_path / "m.bin"
    tmp = temporary_file(final)
    final.mkdir()
    with pytest.raises(OSError, match=f"^cannot write {final}: Is a directory$"):
        replace_file(tmp, final)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_user_files_named_like_temporary_files_survive_an_export(tmp_path, ckpt, fmt):
    """The exports wrote fixed temporary names (road.onnx.tmp; road.tmp.xml and road.tmp.bin) and deleted them: a
    user's files of those names were lost, and two exports to one folder collided. Now unique temporary names,
    only those removed."""
    if fmt == "openvino":
        pytest.importorskip("openvino")
        from icnet_ros.backends.openvino import export_openvino as export
        out, keep = tmp_path / "road.xml", ["road.tmp.xml", "road.tmp.bin"]
    else:
        export, out, keep = export_onnx, tmp_path / "road.onnx", ["road.onnx.tmp"]
    for name in keep:
        (tmp_path / name).write_text(f"user data {name}")
    export(ckpt, out, size=SIZE)
    for name in keep:
        assert (tmp_path / name).read_text() == f"user data {name}"
    written = {out.name} | ({"road.bin"} if fmt == "openvino" else set())
    assert {p.name for p in tmp_path.iterdir()} == written | set(keep)  # no temporary file left
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions, not mkstemp's 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _overflowing_checkpoint(path):
    """A real checkpoint whose weights are finite but overflow float32 (one convolution's weights 1e38, as bit rot
    can make them): its logits are NaN or infinite."""
    from icnet_ros.checkpoint import save_checkpoint

    model = load_model(make_checkpoint(path))
    with torch.no_grad():
        model.backbone.conv_sub1[0].conv.weight.fill_(1e38)
    save_checkpoint(model, path, model.meta)
    return path


def test_weights_that_overflow_are_one_line_not_a_folding_traceback(tmp_path, capsys):
    """Finite weights whose output overflows (a conv weight of 1e38) were a RuntimeError traceback from BN folding
    ('max|diff| nan'), exit status 1: now one line, exit status 2, no file."""
    bad = _overflowing_checkpoint(tmp_path / "bad.safetensors")
    out = tmp_path / "bad.onnx"
    assert export_main([str(bad), "--format", "onnx", "--size", "128x192", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("icnet-export: error")]
    assert errors == [f"icnet-export: error: {bad}: the model's output is NaN or infinite on a test input (corrupt "
                      "weights?); not loaded"], err
    assert "Traceback" not in err and not out.exists()


def test_fp16_help_says_what_each_format_does(capsys):
    """--fp16 said 'fp16 weights and activations' for every format; OpenVINO's fp16 export compresses only the
    stored weights (the model runs at the runtime's precision)."""
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "openvino: fp16 weights only" in text and "onnx: fp16 weights and activations" in text, text


def test_sigterm_during_an_export_leaves_no_temporary_file(tmp_path):
    """icnet-export caught only Ctrl-C: SIGTERM (timeout, systemd, docker stop) killed it before its cleanup, and a
    hidden temporary file of up to the model's size was left per run. Now as Ctrl-C: one line, exit status 143,
    nothing left in the output folder."""
    import time

    model = make_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    script = Path(sys.executable).parent / "icnet-export"
    proc = subprocess.Popen([str(script), str(model), "--format", "onnx", "--size", "256x320", "--output",
                             str(out / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None and [p.name for p in out.iterdir()][0].endswith(".tmp"), list(out.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.splitlines()[-1:]) == (143, ["icnet-export: interrupted"]), err[-2000:]
    assert list(out.iterdir()) == []
