"""UnstructuredWeight: exact round trip, exact byte layout and size, corrupt-state and bad-input errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import nonzero_randn
from sparsecore.formats import FORMATS, FormatError, UnstructuredWeight
from sparsecore.masks import as_matrix

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so -0.0 and +0.0 differ."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _expected_nbytes(n: int, k: int, nnz: int, dtype: torch.dtype, tile_n: int, tile_k: int) -> int:
    tn, tk = -(-n // tile_n), -(-k // tile_k)
    return tn * tk * tile_n * tile_k // 8 + nnz * torch.empty((), dtype=dtype).element_size() + 4 * (tn * tk + 1)


def _random(shape, sparsity, dtype, g):
    w = nonzero_randn(*shape, dtype=dtype, generator=g)
    mask = torch.rand(shape, generator=g) >= sparsity
    return w, mask


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 300), st.sampled_from(DTYPES), st.floats(0, 1),
       st.sampled_from([(16, 32), (16, 256), (32, 64), (128, 64), (16, 512)]), st.integers(0, 2**31 - 1))
def test_round_trip_property(n, k, dtype, sparsity, tiles, seed):
    g = torch.Generator().manual_seed(seed)
    w, mask = _random((n, k), sparsity, dtype, g)
    w[torch.rand(n, k, generator=g) < 0.05] = -0.0  # some kept -0.0 must survive as -0.0
    p = UnstructuredWeight.from_dense(w, mask, tile_n=tiles[0], tile_k=tiles[1])
    assert torch.equal(_bits(p.to_dense()), _bits(torch.where(mask, w, torch.zeros((), dtype=dtype))))
    assert torch.equal(p.mask(), mask)
    assert p.nnz == int(mask.sum())
    assert p.nbytes == _expected_nbytes(n, k, p.nnz, dtype, *tiles)
    tensors, meta = p.state()
    q = UnstructuredWeight.from_state({name: t.clone() for name, t in tensors.items()}, dict(meta))
    for name, t in q.state()[0].items():
        assert torch.equal(t, tensors[name]), name


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_kept_and_all_pruned(seeded, sparsity, dtype):
    w = nonzero_randn(19, 70, dtype=dtype, generator=seeded)
    mask = torch.full(w.shape, sparsity == 0.0)
    p = UnstructuredWeight.from_dense(w, mask, tile_n=16, tile_k=32)
    assert p.nnz == (w.numel() if sparsity == 0.0 else 0)
    assert torch.equal(_bits(p.to_dense()), _bits(torch.where(mask, w, torch.zeros((), dtype=dtype))))
    UnstructuredWeight.from_state(*p.state())


def test_empty_rows_and_zero_tiles(seeded):
    w = nonzero_randn(40, 100, generator=seeded)
    mask = torch.rand(40, 100, generator=seeded) < 0.5
    mask[3] = False                 # empty row
    mask[16:32, 32:64] = False      # one whole 16 x 32 tile
    p = UnstructuredWeight.from_dense(w, mask, tile_n=16, tile_k=32)
    offsets = p.tile_offsets
    assert int(offsets[1 * 4 + 1 + 1]) == int(offsets[1 * 4 + 1])  # tile (1, 1) holds no values
    assert torch.equal(p.to_dense(), torch.where(mask, w, 0.0))


def test_layout_is_the_documented_one():
    """Bits, value order and offsets checked against the docstring by hand on a 2 x 2-tile matrix."""
    n, k = 17, 33  # tile_n = 16, tile_k = 32: tiles (0,0) full, (0,1) one column, (1,0) one row, (1,1) 1 x 1
    w = torch.arange(1, n * k + 1, dtype=torch.float32).reshape(n, k)
    mask = torch.zeros(n, k, dtype=torch.bool)
    kept = [(0, 31), (0, 0), (5, 3), (2, 32), (16, 1), (16, 32)]
    for r, c in kept:
        mask[r, c] = True
    p = UnstructuredWeight.from_dense(w, mask, tile_n=16, tile_k=32)
    assert tuple(p.bitmap.shape) == (2, 2, 16, 1)
    assert int(p.bitmap[0, 0, 0, 0]) == 1 - 2**31          # bits 0 and 31 -> 0x80000001 as int32
    assert int(p.bitmap[0, 0, 5, 0]) == 1 << 3
    assert int(p.bitmap[0, 1, 2, 0]) == 1                  # column 32 is bit 0 of tile column 1
    assert int(p.bitmap[1, 0, 0, 0]) == 1 << 1 and int(p.bitmap[1, 1, 0, 0]) == 1
    assert int(p.bitmap.count_nonzero()) == 5
    order = [(0, 0), (0, 31), (5, 3), (2, 32), (16, 1), (16, 32)]  # tile-major, then row, then column
    assert torch.equal(p.values, torch.tensor([float(w[r, c]) for r, c in order]))
    assert torch.equal(p.tile_offsets, torch.tensor([0, 3, 4, 5, 6], dtype=torch.int32))


def test_conv_weight_round_trip(seeded):
    w = nonzero_randn(7, 5, 3, 3, dtype=torch.float16, generator=seeded)
    mask = torch.rand(w.shape, generator=seeded) < 0.3
    p = UnstructuredWeight.from_dense(w, mask, tile_n=16, tile_k=32)
    assert p.shape == (7, 5, 3, 3) and (p.n, p.k) == (7, 45)
    assert torch.equal(p.to_dense(), torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
    assert torch.equal(p.mask(), mask)
    # the kernel streams the [out, K] view, K ordered (kh, kw, C_in)
    assert torch.equal(p.values, as_matrix(w)[as_matrix(mask)][_storage_order(as_matrix(mask))])
    assert p.state()[1]["shape"] == [7, 5, 3, 3]
    q = UnstructuredWeight.from_state(*p.state())
    assert torch.equal(q.to_dense(), p.to_dense())


def _storage_order(mat_mask: torch.Tensor) -> torch.Tensor:
    """Row-major indices of the kept entries, listed in tile-major storage order (tiles 16 x 32)."""
    r, c = mat_mask.nonzero().unbind(1)
    tiles_k = -(-mat_mask.shape[1] // 32)
    key = ((r // 16) * tiles_k + c // 32) * 10**6 + (r % 16) * 1000 + c % 32
    return torch.argsort(key)


def test_registered_and_bytes_per_element_at_90_percent(seeded):
    assert FORMATS["unstructured"] is UnstructuredWeight
    w = torch.randn(256, 1024, dtype=torch.float16, generator=seeded)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.randperm(w.numel(), generator=seeded)[: w.numel() // 10]] = True
    p = UnstructuredWeight.from_dense(w, mask.reshape(w.shape))
    assert p.nbytes == 256 * 1024 // 8 + 2 * p.nnz + 4 * (16 * 4 + 1)
    assert p.nbytes / w.numel() < 0.33


# ---- corrupt states -------------------------------------------------------------------------------------

def _packed(seeded):
    w = nonzero_randn(20, 70, dtype=torch.float16, generator=seeded)
    return UnstructuredWeight.from_dense(w, torch.rand(20, 70, generator=seeded) < 0.5, tile_n=16, tile_k=32)


def _corrupt(name, t, meta):
    if name == "flip_bit":
        t["bitmap"] = t["bitmap"].clone()
        t["bitmap"][0, 0, 0, 0] ^= 1
    elif name == "padding_bit":
        t["bitmap"] = t["bitmap"].clone()
        t["bitmap"][1, 0, 15, 0] |= 1                    # row 31 >= N = 20
    elif name == "offset_start":
        t["tile_offsets"] = t["tile_offsets"] + 1
    elif name == "offset_swap":
        t["tile_offsets"] = t["tile_offsets"].clone()
        t["tile_offsets"][1], t["tile_offsets"][2] = t["tile_offsets"][2].clone(), t["tile_offsets"][1].clone()
    elif name == "values_short":
        t["values"] = t["values"][:-1]
    elif name == "values_nan":
        t["values"] = t["values"].clone()
        t["values"][0] = float("nan")
    elif name == "values_dtype":
        t["values"] = t["values"].float()
    elif name == "bitmap_dtype":
        t["bitmap"] = t["bitmap"].to(torch.int64)
    elif name == "offsets_dtype":
        t["tile_offsets"] = t["tile_offsets"].to(torch.int64)
    elif name == "bitmap_shape":
        t["bitmap"] = t["bitmap"][:1]
    elif name == "values_2d":
        t["values"] = t["values"].reshape(1, -1)
    elif name == "missing":
        del t["tile_offsets"]
    elif name == "extra":
        t["junk"] = torch.zeros(1)
    elif name == "version":
        meta["version"] = 2
    elif name == "dtype":
        meta["dtype"] = "float64"
    elif name == "shape":
        meta["shape"] = [20]
    elif name == "shape_k":
        meta["shape"] = [20, 200]
    elif name == "tile":
        meta["tile_k"] = 48
    elif name == "kind":
        meta["kind"] = "nm"


@pytest.mark.parametrize("name, match", [
    ("flip_bit", "disagrees with the bitmap"), ("padding_bit", "outside the 20 x 70"),
    ("offset_start", "tile_offsets\\[0\\]"), ("offset_swap", "disagrees with the bitmap"),
    ("values_short", "bitmap keeps"), ("values_nan", "NaN"), ("values_dtype", "'values'"),
    ("bitmap_dtype", "'bitmap'"), ("offsets_dtype", "'tile_offsets'"), ("bitmap_shape", "'bitmap'"),
    ("values_2d", "'values'"), ("missing", r"must hold tensors .*got \['bitmap', 'values'\]"), ("extra", "must hold tensors"),
    ("version", "version"), ("dtype", "unsupported dtype"), ("shape", "meta 'shape'"), ("shape_k", "'bitmap'"),
    ("tile", "tile_k must be one of"), ("kind", "expected 'unstructured'"),
])
def test_corrupt_state_raises(seeded, name, match):
    p = _packed(seeded)
    tensors, meta = p.state()
    tensors, meta = dict(tensors), dict(meta)
    UnstructuredWeight.from_state(dict(tensors), dict(meta))  # intact state loads
    _corrupt(name, tensors, meta)
    with pytest.raises(FormatError, match=match):
        UnstructuredWeight.from_state(tensors, meta)


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_bad_inputs(seeded):
    w = nonzero_randn(8, 40, generator=seeded)
    mask = torch.rand(8, 40, generator=seeded) < 0.5
    mask[0, 0] = True
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf at kept positions"):
        UnstructuredWeight.from_dense(bad, mask)
    bad[0, 0], mask[0, 1] = 1.0, False
    bad[0, 1] = float("inf")  # non-finite at a pruned position is dropped, not an error
    assert torch.equal(UnstructuredWeight.from_dense(bad, mask).to_dense(), torch.where(mask, bad, 0.0))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        UnstructuredWeight.from_dense(w, mask.float())
    with pytest.raises(ValueError, match="does not match weight shape"):
        UnstructuredWeight.from_dense(w, mask[:, :39])
    with pytest.raises(TypeError, match="weight dtype"):
        UnstructuredWeight.from_dense(w.double(), mask)
    with pytest.raises(TypeError, match="weight dtype"):
        UnstructuredWeight.from_dense(w.int(), mask)
    with pytest.raises(ValueError, match="2-D"):
        UnstructuredWeight.from_dense(w.reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match="tile_k must be one of"):
        UnstructuredWeight.from_dense(w, mask, tile_k=48)
    with pytest.raises(ValueError, match="tile_n must be one of"):
        UnstructuredWeight.from_dense(w, mask, tile_n=8)
    with pytest.raises(ValueError, match="tile_n \\* tile_k must be <= 8192"):
        UnstructuredWeight.from_dense(w, mask, tile_n=32, tile_k=512)
    with pytest.raises(TypeError, match="unexpected keyword"):
        UnstructuredWeight.from_dense(w, mask, block=4)
