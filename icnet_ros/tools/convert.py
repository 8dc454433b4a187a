"""icnet-convert: MMSegmentation ICNet checkpoint (.pth) -> native icnet_ros checkpoint (.safetensors), or a native
checkpoint -> a deployment copy (fp16, no auxiliary heads, optionally averaged with other runs of the same recipe),
optionally recording the input size, the network width that ``input_size: auto`` resizes frames to, and the license
of the weights."""
from __future__ import annotations

import argparse
import sys

from ..classes import CLASS_SETS, get_class_set
from ..sizes import parse_sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="icnet-convert",
        description="Convert an MMSegmentation ICNet checkpoint (.pth, read with weights_only=True) into a native "
                    "icnet_ros checkpoint (safetensors + metadata); depth, width and classes are inferred. Given a "
                    "native checkpoint (.safetensors, e.g. a training run's best.safetensors), write a deployment "
                    "copy: --fp16 and --no-aux, metadata kept, the export recorded in its provenance.")
    p.add_argument("src", help="mmseg ICNet checkpoint (.pth), with or without the 'state_dict' wrapper; or a "
                               "native .safetensors checkpoint")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--classes", choices=sorted(CLASS_SETS),
                   help="mmseg checkpoints: class set to record (default: the checkpoint's meta, else Cityscapes "
                        "for 19 classes)")
    p.add_argument("--fp16", action="store_true", help="store weights in half precision (half the size); a native "
                                                      "checkpoint stored in fp16 stays fp16 without it")
    p.add_argument("--no-aux", action="store_true", help="drop the training-only auxiliary heads")
    p.add_argument("--input-size", nargs="+", metavar="HxW | H W | native",
                   help="recommended inference size to record: H W, or 'native' for none (tools then run at each "
                        "frame's own size); default: mmseg: none; native checkpoints: their own")
    p.add_argument("--network-width", metavar="W | none",
                   help="record the network input width the model was trained at (input_size 'auto' resizes "
                        "each frame, keeping its aspect ratio, to it; e.g. 736 for CamVid trained at x1.5), or "
                        "'none' to remove it; default: keep the source's")
    p.add_argument("--average", nargs="+", default=[], metavar="CKPT",
                   help="native checkpoints to average with SRC, weights and BatchNorm statistics uniformly (runs "
                        "of one recipe from the same starting checkpoint, e.g. other seeds); the files are "
                        "recorded in the provenance")
    p.add_argument("--license", metavar="TEXT",
                   help="record the license of the weights (one line, e.g. 'CC BY-NC 4.0 (trained on CamVid; "
                        "non-commercial use only)'); '' removes it; default: keep the source's")
    return p


def _network_width(value: str | None) -> int | str | None:
    if value is None or value == "none":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--network-width takes an integer width or 'none', got {value!r}") from None


def _input_size(values: list[str] | None) -> tuple[int, int] | str | None:
    if values is None:
        return None
    if values == ["native"]:
        return "native"
    try:
        sizes = parse_sizes(values)
    except ValueError:
        sizes = []
    if len(sizes) != 1:
        raise ValueError(f"--input-size takes H W, HxW or 'native', got {' '.join(values)!r}")
    return sizes[0]


def main(argv: list[str] | None = None) -> int:
    from .cli_checks import run_stoppable

    args = build_parser().parse_args(argv)
    # Ctrl-C or SIGTERM: one line, exit status 130 / 143 (the checkpoint is written to a temporary file and renamed:
    # nothing partial is left; SIGTERM killed the process outright, its temporary file left behind)
    return run_stoppable("icnet-convert", lambda stop: _main(args))


def _main(args: argparse.Namespace) -> int:
    """icnet-convert after its arguments are parsed. A checkpoint that cannot be written (a full disk, a file size
    limit, a folder under /proc) is one line ``cannot write DST: REASON``, exit status 2 (before: a SafetensorError
    or FileNotFoundError traceback), and Ctrl-C one line, exit status 130 (before: a KeyboardInterrupt traceback);
    torch is imported here, where Ctrl-C is handled."""
    if not args.dst.lower().endswith(".safetensors"):
        # the file written is always safetensors: under another name no tool would open it (by its suffix)
        print(f"icnet-convert: error: {args.dst}: the output must be a .safetensors file (icnet-convert writes a "
              "native icnet_ros checkpoint; icnet-export writes .onnx and OpenVINO files)", file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError
    from ..convert import convert_checkpoint
    from ..models import count_parameters

    try:
        class_set = get_class_set(args.classes) if args.classes else None
        model = convert_checkpoint(args.src, args.dst, class_set=class_set, fp16=args.fp16,
                                   include_aux=not args.no_aux, input_size=_input_size(args.input_size),
                                   network_width=_network_width(args.network_width), license=args.license,
                                   average=args.average)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"icnet-convert: error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"{args.src} -> {args.dst}: ICNet {c.backbone} width {c.width:g}, {c.num_classes} classes "
          f"({model.meta['dataset']}), {count_parameters(model, include_aux=not args.no_aux) / 1e6:.1f}M parameters"
          f"{', fp16' if (model.meta.get('provenance') or {}).get('exported', {}).get('fp16', args.fp16) else ''}"
          + (f", the average of {len(args.average) + 1} checkpoints" if args.average else "")
          + (f", network width {model.meta['network_width']}" if "network_width" in model.meta else "")
          + (f"; license: {model.meta['license']}" if "license" in model.meta else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
