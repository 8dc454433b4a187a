"""Segmenter on CUDA: device selection, CPU parity, fp16/bf16, pinned/non-blocking transfers, CUDA graphs,
torch.compile, mixed batches, and icnet-bench on the GPU. Skipped without a CUDA GPU."""
import json

import numpy as np
import pytest
import torch
from helpers import make_checkpoint

from icnet_ros.engine import Segmenter, resolve_device
from icnet_ros.optimize import CUDAGraphRunner

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ALL = ("label", "color", "overlay", "confidence")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on the GPU for parity checks (TF32 convolutions would blur near-ties of a random model)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cuda") / "r18.safetensors")


def frames(n=3, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(96, 128), (120, 160), (96, 128), (75, 101)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def agreement(a, b):
    return float((a == b).mean())


def test_device_resolution():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cuda_matches_cpu(ckpt):
    gpu = Segmenter(ckpt, device="cuda", outputs=ALL, warmup=False)
    cpu = Segmenter(ckpt, device="cpu", outputs=ALL, warmup=False)
    assert gpu.device.type == "cuda" and gpu.channels_last
    fs = frames(4)
    for g, c in zip(gpu.segment(fs, channel_order="BGR"), cpu.segment(fs, channel_order="BGR")):
        assert isinstance(g.label, np.ndarray) and g.label.dtype == np.uint8 and g.label.shape == c.label.shape
        assert agreement(g.label, c.label) >= 0.999
        same = g.label == c.label
        np.testing.assert_array_equal(g.color[same], c.color[same])
        assert np.abs(g.overlay[same].astype(int) - c.overlay[same].astype(int)).max() <= 1
        assert np.abs(g.confidence.astype(int) - c.confidence.astype(int)).max() <= 1


def test_optimized_matches_plain_on_cuda(ckpt):
    opt = Segmenter(ckpt, device="cuda", optimize=True, warmup=False)
    plain = Segmenter(ckpt, device="cuda", optimize=False, warmup=False)
    x = torch.randn(2, 3, 128, 192, device="cuda")
    with torch.inference_mode():
        lo, lp = opt.forward(x.contiguous(memory_format=torch.channels_last)), plain.forward(x)
    assert ((lo - lp).abs().max() / lp.abs().max()).item() <= 1e-4
    assert (lo.argmax(1) == lp.argmax(1)).float().mean().item() >= 0.999


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision(ckpt, precision):
    low = Segmenter(ckpt, device="cuda", precision=precision, outputs=ALL, warmup=True)
    ref = Segmenter(ckpt, device="cuda", outputs=ALL, warmup=False)
    assert low.model.backbone.conv_sub1[0].conv.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[
        precision]
    fs = frames(3)
    for a, b in zip(low.segment(fs), ref.segment(fs)):
        assert a.label.dtype == np.uint8 and a.label.max() < 11
        assert agreement(a.label, b.label) >= 0.95  # random weights: many near-ties


def test_results_are_host_arrays_that_survive_the_next_call(ckpt):
    seg = Segmenter(ckpt, device="cuda", outputs=ALL, warmup=False)
    fs = frames(2)
    first = seg.segment(fs)
    kept = [r.label.copy() for r in first]
    seg.segment(frames(2, seed=5))  # must not overwrite the arrays returned before
    for r, k in zip(first, kept):
        np.testing.assert_array_equal(r.label, k)


def test_cuda_graphs_match_eager(ckpt):
    graphs = Segmenter(ckpt, device="cuda", outputs=ALL, cuda_graphs=True, warmup=False)
    eager = Segmenter(ckpt, device="cuda", outputs=ALL, warmup=False)
    for seed in range(3):  # replays (same shapes) and a second shape
        fs = frames(2, seed)
        for g, e in zip(graphs.segment(fs), eager.segment(fs)):
            assert agreement(g.label, e.label) >= 0.999
    assert 1 <= graphs.backend.graphs <= 3
    assert "cuda-graphs" in graphs.describe()


def test_cuda_graph_runner_replays_with_new_inputs():
    lin = torch.nn.Linear(8, 4).cuda().eval()
    x = torch.randn(3, 8, device="cuda")
    with torch.inference_mode():
        runner = CUDAGraphRunner(lin, [x])
        y = torch.randn(3, 8, device="cuda")
        torch.testing.assert_close(runner(y).clone(), lin(y))
        with pytest.raises(ValueError, match="differ"):
            runner(torch.randn(4, 8, device="cuda"))


def test_fixed_size_batches_mixed_frames(ckpt):
    seg = Segmenter(ckpt, device="cuda", input_size=(96, 128), outputs=("label", "overlay"), warmup=True)
    fs = frames(4)
    rs = seg.segment(fs, channel_order=["RGB", "BGR", "RGB", "BGR"])
    for f, r in zip(fs, rs):
        assert r.label.shape == f.shape[:2] and r.overlay.shape == f.shape and r.model_size == (96, 128)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torch_compile_on_cuda(ckpt):
    comp = Segmenter(ckpt, device="cuda", input_size=(96, 128), compile=True, warmup=True)
    eager = Segmenter(ckpt, device="cuda", input_size=(96, 128), warmup=False)
    fs = frames(2)
    for a, b in zip(comp.segment(fs), eager.segment(fs)):
        assert agreement(a.label, b.label) >= 0.999


def test_bench_on_cuda(tmp_path, capsys):
    from icnet_ros.tools.bench import STAGES, main

    js = tmp_path / "b.json"
    assert main(["--arch", "icnet_r18", "--width", "0.5", "--size", "256x512", "--device", "cuda",
                 "--precision", "fp32", "fp16", "--iters", "5", "--warmup", "2", "--stages", "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert "gpu" in doc["environment"]
    for r in doc["results"]:
        assert r["device"].startswith("cuda") and list(r["stages"]) == list(STAGES)
        assert r["pipeline_timing"]["median_ms"] > 0


def test_factorized_ppm_on_cuda_matches_plain(ckpt):
    """The concat-PPM factorization (a cached resize matrix per shape, dtype and device) on the GPU, fp32 and fp16,
    inside a CUDA graph too."""
    import copy

    from icnet_ros.checkpoint import load_model
    from icnet_ros.optimize import compare_logits, factorize_pyramid_pooling, fold_batchnorm

    plain = load_model(ckpt, "cuda").eval()
    opt = copy.deepcopy(plain)
    x = torch.randn(2, 3, 161, 243, device="cuda")
    fold_batchnorm(opt, x)
    assert factorize_pyramid_pooling(opt, x) == 1
    with torch.inference_mode():
        a = compare_logits(plain(x), opt(x))
        half = copy.deepcopy(opt).half().to(memory_format=torch.channels_last)
        b = compare_logits(plain(x), half(x.half().contiguous(memory_format=torch.channels_last)))
    assert a.relative_diff <= 1e-4 and a.argmax_agreement >= 0.999, str(a)
    assert b.argmax_agreement >= 0.97, str(b)  # random weights: near-ties flip in fp16
    seg = Segmenter(ckpt, device="cuda", precision="fp16", input_size=(128, 192), cuda_graphs=True, warmup=True)
    assert seg.factorized_ppms == 1 and "ppm-factorized" in seg.describe()
    ref = Segmenter(ckpt, device="cuda", precision="fp16", input_size=(128, 192), cuda_graphs=False, warmup=False)
    for g, r in zip(seg.segment(frames(2)), ref.segment(frames(2))):
        np.testing.assert_array_equal(g.label, r.label)


def test_cuda_graphs_beyond_every_cache_then_the_first_size_again(ckpt):
    """More input sizes than the graph cache (MAX_CUDA_GRAPHS) and the pooling's matrix cache hold, then the first
    size again: every graph must still read valid matrices (the runner keeps what it captured alive)."""
    from icnet_ros.backends.torch_backend import MAX_CUDA_GRAPHS
    from icnet_ros.optimize import FactorizedPyramidPooling

    graphs = Segmenter(ckpt, device="cuda", outputs=("label",), cuda_graphs=True, warmup=False)
    eager = Segmenter(ckpt, device="cuda", outputs=("label",), warmup=False)
    assert graphs.factorized_ppms == 1
    cap = max(MAX_CUDA_GRAPHS, FactorizedPyramidPooling.MAX_CACHED) + 3
    sizes = [(128 + 32 * i, 160) for i in range(cap)] + [(128, 160), (160, 160)]
    rng = np.random.default_rng(0)
    for h, w in sizes:
        f = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (g,), (e,) = graphs.segment([f]), eager.segment([f])
        assert agreement(g.label, e.label) >= 0.999, (h, w)
    assert graphs.backend.graphs == MAX_CUDA_GRAPHS  # bounded


def test_cuda_graphs_of_the_warmup_sizes_survive_a_stream_of_other_sizes(ckpt):
    """The cameras' graphs (captured at warm-up) are kept however many other shapes pass on the hot path; those
    share MAX_CUDA_GRAPHS places and the first eviction warns once."""
    from icnet_ros.backends.torch_backend import MAX_CUDA_GRAPHS

    seg = Segmenter(ckpt, device="cuda", outputs=("label",), cuda_graphs=True, warmup="128x160;160x192")
    eager = Segmenter(ckpt, device="cuda", outputs=("label",), warmup=False)
    cams = dict(seg.backend._graphs.pinned)
    assert len(cams) == 2
    rng = np.random.default_rng(2)
    with pytest.warns(RuntimeWarning, match="least recently used are evicted") as caught:
        for i in range(MAX_CUDA_GRAPHS + 3):
            seg.segment([rng.integers(0, 256, (192 + 32 * i, 160, 3), dtype=np.uint8)])
    assert sum("evicted" in str(w.message) for w in caught) == 1
    assert seg.backend.graphs == 2 + MAX_CUDA_GRAPHS  # bounded
    for h, w in ((128, 160), (160, 192)):
        f = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (g,), (e,) = seg.segment([f]), eager.segment([f])
        assert agreement(g.label, e.label) >= 0.999
    assert all(seg.backend._graphs.pinned[k] is cams[k] for k in cams)  # the same graphs: never recaptured


def test_no_hidden_synchronisation_in_segment(ckpt):
    """Only the one explicit synchronisation of the copy back: implicit host syncs (.item(), pageable copies,
    nonzero) raise under sync debug mode 'error'. Warmed up at the frames' sizes (a new size builds its pooling
    matrix once, with a blocking upload) and in RGB only: a bgr8 frame's constants exist from the start."""
    seg = Segmenter(ckpt, device="cuda", outputs=ALL, warmup="96x128;120x160")
    fs = frames(2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            seg.segment(fs, channel_order=["RGB", "BGR"])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graphs_captured_at_warmup_for_the_cameras_sizes(ckpt):
    seg = Segmenter(ckpt, device="cuda", cuda_graphs=True, warmup="128x160;160x192")
    assert seg.backend.graphs == 2  # captured before the first frame, not on the hot path
    rng = np.random.default_rng(1)
    seg.segment([rng.integers(0, 256, (128, 160, 3), dtype=np.uint8)])
    assert seg.backend.graphs == 2  # replayed, nothing new captured
    seg.warmup((128, 160), batch=2)  # what the node adds for two cameras of one size
    assert seg.backend.graphs == 3
    two = [rng.integers(0, 256, (128, 160, 3), dtype=np.uint8) for _ in range(2)]
    eager = Segmenter(ckpt, device="cuda", warmup=False).segment(two)
    for got, ref in zip(seg.segment(two), eager):
        assert agreement(got.label, ref.label) > 0.999
    assert seg.backend.graphs == 3  # the batch of two replayed its warm-up graph
