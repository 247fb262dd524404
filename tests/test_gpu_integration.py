"""GPU-only integration: planner on real backends, CUDA graph capture and torch.compile of a sparsified block."""
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
