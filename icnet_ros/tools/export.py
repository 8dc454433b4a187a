"""icnet-export: a native checkpoint -> a deployment model for ONNX Runtime, OpenVINO or TensorRT, at a fixed
network size, with the checkpoint's metadata inside (so the exported file is a complete model for the node and the
CLIs: ``model:=road.onnx``)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..sizes import parse_sizes

FORMATS = ("onnx", "openvino", "tensorrt")


class _HelpFormatter(argparse.HelpFormatter):
    """--size takes one size, as HxW or as H W (two tokens, hence nargs='+'): the usage says HxW, not
    'HxW [HxW ...]'."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "size":
            return "HxW"
        return super()._format_args(action, default_metavar)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icnet-export", formatter_class=_HelpFormatter,
        description="Export a native icnet_ros checkpoint (.safetensors) at a fixed network size with a dynamic "
                    "batch axis. onnx: one .onnx file, the metadata in its metadata_props (ONNX Runtime; pip "
                    "install 'icnet_ros[onnx]'). openvino: OpenVINO IR (.xml + .bin), optionally INT8 calibrated "
                    "with NNCF ('icnet_ros[openvino]'). tensorrt: the .onnx file plus its TensorRT engine, built "
                    "for this GPU and cached beside it ('icnet_ros[tensorrt]', needs an NVIDIA GPU). The export "
                    "is recorded in the metadata's provenance.")
    p.add_argument("model", nargs="?", default=None,
                   help="native .safetensors checkpoint (default: the package's default model)")
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="what to export to")
    p.add_argument("--size", required=True, nargs="+", metavar="HxW",
                   help="the network input size, one: HxW or H W, e.g. 352x480; multiples of 32 (frames are "
                        "resized to it)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="onnx/tensorrt: the batch axis stays dynamic and TensorRT's profile covers 1..N; with "
                        "--static-batch the batch is fixed to N (default 1)")
    p.add_argument("--static-batch", action="store_true", help="a fixed batch of --batch instead of a dynamic one")
    p.add_argument("--fp16", action="store_true",
                   help="onnx: fp16 weights and activations (fp32 input/output); tensorrt: that, built as an fp16 "
                        "engine; openvino: fp16 weights only (half the .bin; it runs at the runtime's precision, "
                        "fp32 on the CPU by default)")
    p.add_argument("--int8", action="store_true", help="openvino: INT8 post-training quantization (needs --calib)")
    p.add_argument("--calib", metavar="DIR", default=None,
                   help="--int8: calibration images (an image folder, or a dataset split with images/)")
    p.add_argument("--calib-count", type=int, default=300, metavar="N", help="--int8: images used (default 300)")
    p.add_argument("--opset", type=int, default=None,
                   help="onnx/tensorrt: ONNX opset (default: the exporter's; one it cannot write is an error)")
    p.add_argument("--output", "-o", required=True,
                   help="output file: onnx: .onnx; openvino: .xml (+ .bin); tensorrt: .onnx (the engine is cached "
                        "beside it, found when the .onnx is run) or .engine/.plan (the .onnx beside it, the "
                        "engine's metadata in ENGINE.json)")
    return p


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    """The export size; ValueError for flags that do not go together."""
    from ..backends.base import require
    from ..export import check_export_size

    sizes = parse_sizes(args.size)
    if len(sizes) != 1:
        raise ValueError(f"--size takes one size, HxW or H W, got {' '.join(args.size)!r}")
    size = check_export_size(sizes[0])
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.int8 and args.format != "openvino":
        raise ValueError("--int8 is for --format openvino (INT8 quantization with NNCF)")
    if args.int8 and not args.calib:
        raise ValueError("--int8 needs calibration images: --calib DIR")
    if args.int8 and args.fp16:
        raise ValueError("choose --fp16 or --int8, not both")
    if args.calib and not args.int8:
        raise ValueError("--calib is only used with --int8")
    if args.opset is not None and args.format == "openvino":
        raise ValueError("--opset is for onnx and tensorrt exports")
    if args.opset is not None:  # one the exporter cannot write fails now, never silently another
        from ..export import check_opset

        require("onnx", "onnx", "onnx")
        try:
            check_opset(args.opset)
        except ValueError as e:
            raise ValueError(f"--opset {args.opset}: {e}") from None
    from ..export import check_output_path

    # 'models/' or an existing folder: refused for every format (the OpenVINO export wrote models.xml beside an
    # empty models/ folder; ONNX and TensorRT failed with '[Errno 21] Is a directory' after the whole export)
    check_output_path(args.output, "--output")
    suffix = Path(args.output).suffix.lower()
    if args.format == "onnx" and suffix != ".onnx":
        raise ValueError(f"--output {args.output}: an ONNX file name ending in .onnx")
    if args.format == "openvino" and suffix in (".onnx", ".engine", ".plan", ".safetensors", ".bin"):
        # (named x.onnx.xml + x.onnx.bin before: a later model:=x.onnx loaded an older export, or nothing)
        raise ValueError(f"--output {args.output}: an OpenVINO IR file name ending in .xml (its weights go beside "
                         f"it as .bin); {suffix} is another format's")
    if args.format == "tensorrt" and suffix not in (".onnx", ".engine", ".plan"):
        raise ValueError(f"--output {args.output}: .onnx (the engine is cached beside it) or .engine/.plan (the "
                         "ONNX file goes beside it)")
    if args.model is not None and Path(args.model).suffix.lower() != ".safetensors":
        raise ValueError(f"{args.model}: expected a native .safetensors checkpoint (convert mmseg .pth files with "
                         "icnet-convert first)")
    from .cli_checks import output_file_problem

    # before minutes of export, not after: a folder of that name, a file where a folder must be, a read-only folder
    outputs = [args.output]
    if args.format == "tensorrt" and suffix != ".onnx":  # the ONNX file is written beside the engine
        outputs.append(str(Path(args.output).with_suffix(".onnx")))
    if args.format == "openvino":  # the exporter's own names: .xml appended when missing, the weights beside it
        from ..backends.openvino import ir_paths

        outputs = [str(p) for p in ir_paths(args.output)]
    for path in outputs:
        problem = output_file_problem(path, "--output")
        if problem:
            raise ValueError(problem)
    return size


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_stoppable

    args = build_parser().parse_args(argv)
    # files are written to a temporary file and renamed: a Ctrl-C or SIGTERM (timeout, systemd, docker stop) leaves
    # nothing partial (SIGTERM killed the process before its cleanup: a 50 MB hidden temporary file per run)
    return run_stoppable("icnet-export", lambda stop: _main(args, argv))


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    from ..backends.base import MissingRuntimeError, require  # torch: imported here, where Ctrl-C is one line
    from ..checkpoint import CheckpointError, default_model_path

    command = shlex.join(["icnet-export", *(sys.argv[1:] if argv is None else argv)])
    try:
        size = _check_args(args)
        t0 = time.perf_counter()
        model = args.model or default_model_path()
        print(f"icnet-export: {model} -> {args.output} ({args.format}, {size[0]}x{size[1]}"
              f"{', fp16' if args.fp16 else ''}{', int8' if args.int8 else ''}) ...", file=sys.stderr, flush=True)
        if args.format == "openvino":
            from ..backends.openvino import export_openvino

            out = export_openvino(model, args.output, size, batch=args.batch if args.static_batch else None,
                                  fp16=args.fp16, int8=args.int8, calib_dir=args.calib,
                                  calib_count=args.calib_count, progress=True, command=command)
            print(f"{out} ({time.perf_counter() - t0:.0f} s)")
            return 0
        from ..export import export_onnx

        output = Path(args.output)
        if args.format == "tensorrt":  # fail before minutes of export
            import torch

            require("tensorrt", "tensorrt", "tensorrt")
            if not torch.cuda.is_available():
                raise ValueError("--format tensorrt builds the engine for the GPU it runs on, and CUDA is not "
                                 "available here: export --format onnx here, then build the engine on the target "
                                 "(icnet-export --format tensorrt there, or the node on first use)")
            if output.suffix.lower() != ".onnx":
                from ..backends.tensorrt import folder_problem

                output.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                problem = folder_problem(output.parent.resolve(), "the output folder")
                if problem:  # the backend would refuse to load the engine built there (engines are code)
                    raise CheckpointError(f"--output {output}: {problem}; an engine is loaded only from a folder no "
                                          "group or other user can write (chmod go-w, or another folder)")
        # the name given when it ends in .onnx (any case, as checked above), else the ONNX file beside the engine
        onnx_out = output if output.suffix.lower() == ".onnx" else output.with_suffix(".onnx")
        try:
            out = export_onnx(model, onnx_out, size, batch=args.batch, dynamic_batch=not args.static_batch,
                              fp16=args.fp16, opset=args.opset, command=command, progress=True)
        except OSError as e:
            if e.filename is not None or not e.strerror:  # reading the checkpoint (named), or already worded
                raise
            # the write of the model (a full disk, a file size limit): the system's error names no file
            raise OSError(f"cannot write {onnx_out}: {e.strerror}") from e
        print(f"{out} ({time.perf_counter() - t0:.0f} s)")
        if args.format == "tensorrt":
            from ..backends.base import BackendOptions
            from ..backends.tensorrt import build_engine, open_backend

            print("icnet-export: building the TensorRT engine (minutes) ...", file=sys.stderr, flush=True)
            if output.suffix.lower() == ".onnx":  # into the engine cache beside the ONNX file
                backend = open_backend(out, BackendOptions(device=torch.device("cuda")))
                engine = backend.engine_file
                backend.close()
            else:  # an fp16 export builds an fp16 engine (strongly typed)
                engine = build_engine(out, output)
            print(f"{engine} ({time.perf_counter() - t0:.0f} s)")
    except (CheckpointError, MissingRuntimeError, ValueError, OSError) as e:
        print(f"icnet-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
