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


@pytest.mark.parametrize("compiler, batches, graphs", [
    ("aot_eager", (2, 3, 4), 2),  # 16 rows (unplanned: dense in the graph), then 24 and 32: one graph
    ("inductor", (3,), 1),           # inductor's own C++ code around the custom ops; one graph keeps it quick
])
def test_compiled_sparse_bert_matches_float64_masked_model(compiler, batches, graphs, seeded, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start for one graph
    model = _Hidden(_tiny_bert(int(torch.randint(0, 2**31, (1,), generator=seeded))))
    config = sc.SparsityConfig("unstructured", 0.9)
    masks = sc.magnitude_masks(model, config, lambda m, fqn: fqn.startswith("bert.encoder.")
                               and isinstance(m, torch.nn.Linear))
    assert len(masks) == 6
    ref = masked_copy(model, masks)
    sc.sparsify(model, config, masks=masks)
    backend = _backend()
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:  # a plan as sc.plan records it; batch 2 (16 rows) stays unplanned and runs dense
        layer.load_plan({8: backend, 32: backend})
    assert all(not layer.dense_held for layer in layers)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, 97, (batch, SEQ), generator=seeded)
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        mask[0, SEQ - 3:] = 0  # padding in the first sequence: the attention mask is not all ones
        return ids, mask

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # no eager call first: the plan's backends were resolved and prepared ahead of tracing
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    with torch.no_grad():
        for batch in batches:
            ids, mask = inputs(batch)
            assert_close_to_ref(compiled(ids, mask), ref(ids, mask), k=128)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert all(not layer.dense_held for layer in layers)  # the unplanned bucket made no dense copy
