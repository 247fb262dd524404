"""Selection rules, validators and the [out, K] view: exact counts, exact tie rule."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore import masks as M


def test_keep_topk_tie_rule_lower_index_first():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert torch.equal(M.keep_topk(scores, 2), torch.tensor([False, True, True, False, False]))
    assert torch.equal(M.keep_topk(torch.zeros(2, 3), 4), torch.tensor([[True, True, True], [True, False, False]]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_keep_topk_exact_count_and_order(rows, cols, frac, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (rows, cols), generator=g).float()  # many ties on purpose
    k = M.keep_count(scores.numel(), frac)
    mask = M.keep_topk(scores, k)
    assert int(mask.sum()) == k == scores.numel() - round(scores.numel() * frac)
    if 0 < k < scores.numel():  # every kept score >= every pruned one; at equal score, kept index < pruned index
        kept, pruned = scores[mask], scores[~mask]
        assert float(kept.min()) >= float(pruned.max())
        cut = float(kept.min())
        flat, fm = scores.flatten(), mask.flatten()
        tie_idx = (flat == cut).nonzero().flatten()
        assert torch.equal(fm[tie_idx], torch.sort(fm[tie_idx].int(), descending=True, stable=True).values.bool())


def _keep_topk_by_sort(scores, k):
    """The tie rule as first written: a stable descending sort keeps the first k (lower index first)."""
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_keep_topk_selection_equals_the_stable_sort(dtype, seeded):
    for trial in range(30):
        shape = [(7, 13), (5, 3, 2, 4), (257,), (64, 96)][trial % 4]
        levels = int(torch.randint(1, 12, (1,), generator=seeded))  # few distinct values: ties everywhere
        scores = torch.randint(-levels, levels + 1, shape, generator=seeded).to(dtype)
        if dtype.is_floating_point:
            scores = torch.where(torch.rand(shape, generator=seeded) < 0.2, torch.randn(shape, generator=seeded).to(dtype), scores)
            scores[torch.rand(shape, generator=seeded) < 0.1] = -0.0  # -0.0 ties with +0.0
        numel = scores.numel()
        for k in {0, 1, numel - 1, numel, int(torch.randint(0, numel + 1, (1,), generator=seeded))}:
            assert torch.equal(M.keep_topk(scores, k), _keep_topk_by_sort(scores, k)), (trial, k)


def test_keep_topk_rejects_non_finite_scores():
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            M.keep_topk(torch.tensor([1.0, bad, 2.0]), 1)


def test_keep_n_of_m_exact_per_group(seeded):
    w = torch.randn(6, 3, 2, 2, generator=seeded)  # conv: K = 2*2*3 = 12; groups of 4 run along C_in... K ordered (kh,kw,C_in)
    with pytest.raises(ValueError, match="divisible by m=8"):
        M.keep_n_of_m(w.abs(), 2, 8)
    w = torch.randn(6, 8, 3, 3, generator=seeded)
    mask = M.keep_n_of_m(w.abs(), 2, 4)
    mat = M.as_matrix(mask).reshape(6, -1, 4)
    assert torch.equal(mat.sum(-1), torch.full((6, 18), 2))
    M.check_nm(mask, 2, 4)
    # group members are consecutive input channels at one (kh, kw) tap
    expected = torch.zeros_like(mask)
    scores = w.abs()
    for o in range(6):
        for i in range(3):
            for j in range(3):
                for g0 in range(0, 8, 4):
                    top = torch.sort(scores[o, g0:g0 + 4, i, j], descending=True, stable=True).indices[:2] + g0
                    expected[o, top, i, j] = True
    assert torch.equal(mask, expected)


def test_as_matrix_round_trip(seeded):
    w = torch.randn(5, 3, 2, 4, generator=seeded)
    assert torch.equal(M.from_matrix(M.as_matrix(w), w.shape), w)
    assert torch.equal(M.as_matrix(w)[:, :3], w[:, :, 0, 0])
    with pytest.raises(ValueError, match="2-D Linear or 4-D Conv2d"):
        M.as_matrix(torch.zeros(3))


def test_check_nm_names_the_offending_group():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 4:7] = True
    with pytest.raises(M.PatternError, match="row 1, group 1"):
        M.check_nm(mask, 2, 4)
    assert not M.is_nm(mask, 2, 4) and M.is_nm(mask, 3, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        M.check_nm(mask, 5, 4)


def test_channel_masks():
    ch = M.keep_channels(torch.tensor([3.0, 1.0, 2.0, 3.0]), 2)
    assert torch.equal(ch, torch.tensor([True, False, False, True]))
    full = M.channel_to_weight_mask(ch, (4, 2, 3, 3))
    assert torch.equal(M.check_channel(full), ch)
    full[0, 0, 0, 0] = False
    with pytest.raises(M.PatternError, match="output channel 0 is partly kept"):
        M.check_channel(full)


def test_bad_scores_and_masks():
    with pytest.raises(ValueError, match="NaN"):
        M.keep_topk(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="k must be in"):
        M.keep_topk(torch.ones(3), 4)
    with pytest.raises(ValueError, match="sparsity must be"):
        M.keep_count(10, 1.5)
    with pytest.raises(TypeError, match="torch.bool"):
        M.check_mask(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="does not match weight shape"):
        M.check_mask(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2))


def test_from_matrix_gives_standard_strides_for_1x1_kernels():
    # a channels-last-strided weight makes the convolution libraries switch every activation to channels-last
    w = M.from_matrix(torch.randn(8, 16), (8, 16, 1, 1))
    assert w.stride() == (16, 1, 1, 1)
