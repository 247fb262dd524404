"""GPU-only integration: planner on real backends, CUDA graph capture and torch.compile of a sparsified block."""
import time

import pytest
import torch

import sparsecore as sc
from sparsecore.models.transformer import DecoderBlock

pytestmark = pytest.mark.gpu

CONFIGS = [sc.SparsityConfig("nm", n=2, m=4), sc.SparsityConfig("unstructured", 0.9)]


def _block(config, backend="auto"):
    torch.manual_seed(0)
    dense = DecoderBlock(512, 1376, heads=8).cuda().half().eval()
    masks = sc.magnitude_masks(dense, config)
    ref = DecoderBlock(512, 1376, heads=8).cuda().half().eval()
    ref.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for fqn, m in masks.items():
            ref.get_submodule(fqn).weight.mul_(m)
    sparse = sc.sparsify(dense, sc.SparsityConfig(config.pattern, config.sparsity, config.n, config.m, backend=backend),
                         masks=masks)
    return ref, sparse


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.pattern)
def test_planned_block_matches_and_is_not_slower(config, tmp_path):
    ref, sparse = _block(config)
    x = torch.randn(4, 1, 512, device="cuda", dtype=torch.float16)
    sc.plan(sparse, (x,), cache_path=tmp_path / "p.json")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), ref(x), atol=2e-2, rtol=2e-2)
        from triton.testing import do_bench
        t_dense, t_sparse = do_bench(lambda: ref(x)), do_bench(lambda: sparse(x))
    assert t_sparse <= 1.10 * t_dense, (t_sparse, t_dense)


@pytest.mark.parametrize("backend", ["triton_nm", "cusparselt"])
def test_cuda_graph_capture_replays_exactly(backend):
    if backend == "cusparselt" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuSPARSELt needs sm80+")
    _, sparse = _block(CONFIGS[0], backend=backend)
    x = torch.randn(2, 1, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = sparse(x)  # prepares backend state and autotunes outside the capture
        sparse(x)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = sparse(static_x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(static_y, eager)


@pytest.mark.parametrize("backend", ["triton_nm", "triton_spmm"])
def test_compile_fullgraph_on_gpu(backend):
    config = CONFIGS[0] if backend == "triton_nm" else CONFIGS[1]
    _, sparse = _block(config, backend=backend)
    x = torch.randn(3, 1, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = sparse(x)
        torch._dynamo.reset()
        compiled = torch.compile(sparse, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-2, rtol=1e-2)


def test_host_ms_measures_issue_cost_only():
    from sparsecore.timing import host_ms

    y = torch.zeros(16, device="cuda")

    def busy_then_launch(us=300):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < us * 1e-6:
            pass
        y.add_(1)

    def syncing():
        y.add_(1)
        torch.cuda.synchronize()

    assert host_ms(lambda: y.add_(1), "cuda") < 0.1
    assert 0.3 <= host_ms(busy_then_launch, "cuda") < 1.5
    assert host_ms(syncing, "cuda", warmup=1, rep=3) > 1.0  # waits for the queued sleep: rightly slow


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.pattern)
def test_graph_plan_capture_and_replay(config, tmp_path):
    from sparsecore.timing import capture_cuda_graph

    ref, sparse = _block(config)
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        entries = sc.plan(sparse, (x,), cache_path=tmp_path / "p.json", cuda_graphs=True)
        assert entries and all(e.host_ms == {} and e.gpu_ms for e in entries)
        graph, out = capture_cuda_graph(lambda: sparse(x), "cuda")
        x.copy_(torch.randn_like(x))  # a new input in the same buffer: the replay must use it
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ref(x), atol=2e-2, rtol=2e-2)
