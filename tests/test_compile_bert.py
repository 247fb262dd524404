"""A sparsified BERT under torch.compile (inductor, CPU) right after planning: one graph, no eager warm-up call,
one compiled graph per batch bucket, output equal to the float64 masked dense model.

A tiny BERT built from a transformers config (1 layer, hidden 64) stands in for all-MiniLM-L6-v2: the same
modules, masks and attention code, small enough to compile in seconds.
"""
import pytest
import torch

import sparsecore as sc
from helpers import assert_close_to_ref
from sparsecore.modules import SparseLinear
from sparsecore.pruning.base import masked_copy

transformers = pytest.importorskip("transformers")

SEQ = 8


def _tiny_bert(seed: int) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


class _Hidden(torch.nn.Module):
    """``(input_ids [B, T], attention_mask [B, T]) -> last hidden state [B, T, 64]``."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _backend() -> str:
    from sparsecore.backends.registry import compiler_why_not

    if compiler_why_not(torch.empty(0)) is None:
        from sparsecore.kernels import cpu
        if cpu.why_unavailable() is None:
            return "cpu_columns"
    return "torch_csr"  # no C++ compiler: the torch CSR custom op is the sparse backend traced


def _sparse_tiny_bert(seeded) -> tuple[torch.nn.Module, torch.nn.Module, list[SparseLinear]]:
    """(sparse model planned for 8 and 64 rows, its float64 masked dense reference, its sparse layers)."""
    model = _Hidden(_tiny_bert(int(torch.randint(0, 2**31, (1,), generator=seeded))))
    config = sc.SparsityConfig("unstructured", 0.9)
    masks = sc.magnitude_masks(model, config, lambda m, fqn: fqn.startswith("bert.encoder.")
                               and isinstance(m, torch.nn.Linear))
    assert len(masks) == 6
    ref = masked_copy(model, masks)
    sc.sparsify(model, config, masks=masks)
    backend = _backend()
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:  # a plan as sc.plan records it: batch 1 (8 rows) and batches 5-8 (33-64 rows)
        layer.load_plan({8: backend, 64: backend})
    assert all(not layer.dense_held for layer in layers)
    return model, ref, layers


def _inputs(batch: int, seeded) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, (batch, SEQ), generator=seeded)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[0, SEQ - 3:] = 0  # padding in the first sequence: the attention mask is not all ones
    return ids, mask


@pytest.mark.parametrize("compiler, batches, graphs", [
    ("aot_eager", (1, 5, 8, 6), 2),  # batch 1, then one dynamic graph for bucket 64 (batches 5-8)
    ("inductor", (1,), 1),           # inductor's own C++ code around the custom ops; one graph keeps it quick
])
def test_compiled_sparse_bert_matches_float64_masked_model(compiler, batches, graphs, seeded, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start for one graph
    model, ref, layers = _sparse_tiny_bert(seeded)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # no eager call first: the plan's backends were resolved and prepared ahead of tracing
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        for batch in batches:
            ids, mask = _inputs(batch, seeded)
            assert_close_to_ref(compiled(ids, mask), ref(ids, mask), k=128)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_unplanned_batch_breaks_the_graph_once(seeded):
    """A bucket no plan covers runs dense as it would eagerly (a graph break prepares it); the next call of
    that bucket recompiles without the break."""
    model, ref, _ = _sparse_tiny_bert(seeded)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        ids, mask = _inputs(2, seeded)  # 16 rows: bucket 16, unplanned
        assert_close_to_ref(compiled(ids, mask), ref(ids, mask), k=128)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        assert breaks > 0
        ids, mask = _inputs(2, seeded)
        assert_close_to_ref(compiled(ids, mask), ref(ids, mask), k=128)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
