#!/usr/bin/env python3
"""Measure the OpenVINO backend against PyTorch eager on the CPU: latency and (optionally) INT8 accuracy.

One process, round-robin, medians. Latency: model alone (a prepared input) and the Segmenter's pipeline (uint8
frame -> resize + normalise -> network -> bilinear upsampling to the frame size -> argmax -> uint8 labels) for
the torch backend (fp32, eager, the Segmenter's optimisations), OpenVINO fp32 and, with ``--int8-calib``,
OpenVINO INT8 (the Segmenter running the exported files), at each ``--threads`` count.
Accuracy (``--eval-data``): mIoU of each variant on a dataset split, every image resized to the export size,
logits upsampled to the label size (icnet_ros.evaluate.evaluate with the backend behind it).

Example (the numbers in BENCHMARKS.md / notes):
    python scripts/openvino_bench.py --size 544 736 --threads 2 1 \
        --int8-calib ../shared/data/camvid/train --eval-data ../shared/data/camvid --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icnet_ros.backends.base import BackendOptions
from icnet_ros.backends.openvino import INT8_IGNORED_TYPES, export_openvino, open_backend
from icnet_ros.checkpoint import default_model_path, load_model
from icnet_ros.engine import Segmenter
from icnet_ros.preprocess import Normalizer


class BackendModule(nn.Module):
    """A backend as an eval-mode module (for icnet_ros.evaluate.evaluate)."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(x.contiguous()).clone()


def round_robin(fns: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="native checkpoint (default: the package's default model)")
    p.add_argument("--random", default=None, metavar="ARCH", help="random weights instead: icnet_r50 etc.")
    p.add_argument("--width", type=float, default=1.0, help="with --random: width")
    p.add_argument("--num-classes", type=int, default=19, help="with --random: classes")
    p.add_argument("--size", type=int, nargs=2, default=(544, 736), metavar=("H", "W"))
    p.add_argument("--frame", default=None, help="image for the pipeline (default: first CamVid val image or noise)")
    p.add_argument("--frame-size", type=int, nargs=2, default=(720, 960), metavar=("H", "W"),
                   help="frame size when no --frame is given")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--work", default="/tmp/openvino_bench", help="where exports go (reused when present)")
    p.add_argument("--int8-calib", default=None, help="calibration folder: also export and time an INT8 model")
    p.add_argument("--calib-count", type=int, default=300)
    p.add_argument("--int8-options", default="{}", help="JSON of extra nncf.quantize arguments (experiments)")
    p.add_argument("--int8-name", default="int8", help="name of the INT8 export in --work")
    p.add_argument("--bf16", action="store_true", help="also the fp32 export run in bf16 (AVX512-BF16/AMX CPUs)")
    p.add_argument("--eval-data", default=None, help="dataset root: mIoU of every variant on --split")
    p.add_argument("--split", default="val")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--only", nargs="+", default=None, help="evaluate only these variants (e.g. ov_bf16)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = tuple(args.size)
    if args.random:
        from icnet_ros.checkpoint import build_meta, save_checkpoint
        from icnet_ros.models import build_icnet

        torch.manual_seed(0)
        m = build_icnet(args.random, width=args.width, num_classes=args.num_classes)
        src = work / f"{args.random}_w{args.width:g}.safetensors"
        save_checkpoint(m, src, build_meta(m.config), include_aux=False)
    else:
        src = Path(args.model) if args.model else default_model_path()
    stem = f"{src.stem}_{size[0]}x{size[1]}"
    results: dict = {"model": str(src), "size": list(size), "machine": os.uname().nodename,
                     "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "exports": {}}
    variants = {"ov_fp32": work / f"{stem}_fp32.xml"}
    if args.int8_calib:
        variants["ov_int8"] = work / f"{stem}_{args.int8_name}.xml"
    for name, xml in variants.items():
        if not xml.is_file():
            t0 = time.perf_counter()
            if name == "ov_fp32":
                export_openvino(src, xml, size=size)
            else:
                extra = json.loads(args.int8_options)
                if extra:  # an experiment: quantize with other NNCF options (same calibration images)
                    _export_int8_with(src, xml, size, args.int8_calib, args.calib_count, extra)
                else:
                    export_openvino(src, xml, size=size, int8=True, calib_dir=args.int8_calib,
                                    calib_count=args.calib_count)
            results["exports"][name] = {"path": str(xml), "seconds": round(time.perf_counter() - t0, 1)}
            print(f"exported {xml} in {results['exports'][name]['seconds']} s", file=sys.stderr)

    model = load_model(src)
    norm = Normalizer(model.meta["normalization"])
    if args.frame:
        from icnet_ros.data.datasets import read_image

        frame = read_image(args.frame)
    else:
        frame = np.random.default_rng(0).integers(0, 256, (*args.frame_size, 3), dtype=np.uint8)
    results["frame"] = list(frame.shape)

    if not args.no_latency:
        results["latency_ms"] = {}
        for n in args.threads:
            torch.set_num_threads(n)  # the Segmenter gives the OpenVINO backend torch's thread count
            segs = {"torch_fp32": Segmenter(src, device="cpu", input_size=size)}
            segs.update({k: Segmenter(v, device="cpu") for k, v in variants.items()})
            if args.bf16:  # the fp32 file with OpenVINO's bf16 inference precision
                segs["ov_bf16"] = Segmenter(variants["ov_fp32"], device="cpu", precision="bf16")
            fns = {}
            for k, seg in segs.items():
                x = seg.prepare(seg.upload([frame]), "RGB", size)
                fns[f"{k} model"] = (lambda seg=seg, x=x: seg.forward(x))
            for k, seg in segs.items():
                fns[f"{k} pipeline"] = (lambda seg=seg: seg.segment([frame]))
            with torch.inference_mode():
                med = round_robin(fns, args.reps)
            results["latency_ms"][f"{n} threads"] = {k: round(v, 2) for k, v in med.items()}
            for k, v in med.items():
                base = med["torch_fp32 " + k.split()[-1]]
                print(f"{n} threads  {k:22s} {v:8.1f} ms  x{base / v:.2f} vs torch", file=sys.stderr)
            for seg in segs.values():
                seg.close()

    if args.eval_data:
        from torch.utils.data import DataLoader

        from icnet_ros.data.datasets import DataSpec, build_dataset, collate_segmentation
        from icnet_ros.evaluate import evaluate
        from icnet_ros.metrics import metrics_from_confusion

        torch.set_num_threads(max(args.threads))
        dataset = build_dataset(DataSpec(root=args.eval_data), args.split)
        loader = DataLoader(dataset, batch_size=1, collate_fn=collate_segmentation)
        nets = {"torch_fp32": model}
        nets.update({k: BackendModule(open_backend(v, BackendOptions(threads=max(args.threads))))
                     for k, v in variants.items()})
        if args.bf16:
            nets["ov_bf16"] = BackendModule(open_backend(variants["ov_fp32"], BackendOptions(
                threads=max(args.threads), precision="bf16")))
        results["mIoU"] = {}
        if args.only:
            nets = {k: v for k, v in nets.items() if k in args.only}
        for k, net in nets.items():
            cm = evaluate(net, loader, norm, dataset.class_set.num_classes, dataset.class_set.ignore_index,
                          torch.device("cpu"), input_size=size, desc=k)
            miou = metrics_from_confusion(cm.matrix)["mIoU"] * 100
            results["mIoU"][k] = round(miou, 2)
            print(f"{k}: {args.split} mIoU {miou:.2f} ({len(dataset)} images at {size[0]}x{size[1]})",
                  file=sys.stderr)
    results["loadavg_end"] = os.getloadavg()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def _export_int8_with(src: Path, xml: Path, size, calib_dir, count, extra: dict) -> None:
    """An INT8 export with extra nncf.quantize arguments ("ignored_types": [..] / "ignored_names": [..] become an
    IgnoredScope, added to the export's own MatMul scope; "preset": "mixed"; "fast_bias_correction": true...)."""
    import nncf

    options = dict(extra)
    if "ignored_types" in options or "ignored_names" in options or "ignored_patterns" in options:
        options["ignored_scope"] = nncf.IgnoredScope(types=[*INT8_IGNORED_TYPES, *options.pop("ignored_types", [])],
                                                     names=options.pop("ignored_names", []),
                                                     patterns=options.pop("ignored_patterns", []), validate=False)
    if "preset" in options:
        options["preset"] = nncf.QuantizationPreset(options["preset"])
    export_openvino(src, xml, size=size, int8=True, calib_dir=calib_dir, calib_count=count,
                    int8_options=options)


if __name__ == "__main__":
    sys.exit(main())
