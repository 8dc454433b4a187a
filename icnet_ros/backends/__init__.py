"""Inference backends behind the Segmenter: torch, ONNX Runtime, OpenVINO, TensorRT (see base.py)."""
