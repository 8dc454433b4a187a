"""Preprocessor on the CPU (OpenCV, frame by frame) and its torch path (what runs on CUDA, run here on CPU tensors)
against the torch definition: float32 bilinear resize with align_corners=False, then (x - mean) / std in the
model's channel order, in the backend's dtype and layout."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.preprocess import Normalizer, Preprocessor

NORM = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "channel_order": "RGB"}


def _reference(frames, order, size):
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return Normalizer(NORM)(x, order, channels_last_input=False)


def _prepare(pre, impl):
    """The preprocessing of one implementation: 'opencv' (what the CPU runs) or 'torch' (the CUDA path)."""
    return pre if impl == "opencv" else pre._prepare_torch


@pytest.mark.parametrize("impl", ["opencv", "torch"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("channels,size", [(3, (128, 160)), (1, (64, 96)), (3, (101, 133)), (3, (48, 61))])
def test_matches_the_torch_definition(memory_format, order, channels, size, impl):
    frames = np.random.default_rng(3).integers(0, 256, (2, 101, 133, channels), dtype=np.uint8)
    pre = Preprocessor(NORM, torch.device("cpu"), torch.float32, memory_format)
    x = _prepare(pre, impl)(torch.from_numpy(frames), order, size)
    assert x.shape == (2, 3, *size) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=memory_format)
    # 1e-4 on normalised values is under 0.01 grey levels
    assert (x - _reference(frames, order, size)).abs().max().item() < 1e-4


def test_channel_order_is_the_models():
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red
    pre = Preprocessor(NORM, torch.device("cpu"), torch.float32, torch.contiguous_format)
    from_rgb = pre(torch.from_numpy(rgb), "RGB", (8, 8))
    from_bgr = pre(torch.from_numpy(rgb[..., ::-1].copy()), "BGR", (8, 8))
    torch.testing.assert_close(from_rgb, from_bgr)
    assert from_rgb[0, 0, 0, 0].item() == pytest.approx((200 - 123.675) / 58.395, rel=1e-6)
    with pytest.raises(ValueError, match="channel_order"):
        pre(torch.from_numpy(rgb), "RGBA", (8, 8))


@pytest.mark.parametrize("impl", ["opencv", "torch"])
def test_backend_dtype(impl):
    frames = np.random.default_rng(4).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
    pre = Preprocessor(NORM, torch.device("cpu"), torch.bfloat16, torch.channels_last)
    x = _prepare(pre, impl)(torch.from_numpy(frames), "RGB", (32, 64))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), _reference(frames, "RGB", (32, 64)), atol=0.02, rtol=0.01)
