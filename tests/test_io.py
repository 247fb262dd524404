"""save/load: bit-exact round trip, strict loading, clear errors on corrupt, truncated or foreign files."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsecore as sc
from helpers import rewrite_header
from test_modules import PATTERNS, TinyNet


def _saved(tmp_path, config, dtype=torch.float32):
    model = sc.sparsify(TinyNet().to(dtype), config)
    path = sc.save(model, tmp_path / "m.safetensors", config=config)
    return model, path


@pytest.mark.parametrize("config", PATTERNS, ids=lambda c: c.pattern)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, config, dtype, seeded):
    model, path = _saved(tmp_path, config, dtype)
    loaded = sc.load(path, TinyNet())  # fp32 skeleton: the file's dtype wins
    assert isinstance(loaded.fc1, sc.SparseLinear) and loaded.fc1.packed.kind == config.pattern
    src, dst = model.state_dict(), loaded.state_dict()
    assert src.keys() == dst.keys()
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    x = torch.randn(2, 8, 8, 8, generator=seeded).to(dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert sc.read(path).header["config"] == config.to_json()


def test_tied_weights_stored_once(tmp_path):
    a = nn.Linear(8, 8)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = a.weight
    path = sc.save(model, tmp_path / "t.safetensors")
    header = sc.read(path).header
    assert header["aliases"] == {"2.weight": "0.weight"}
    fresh = sc.load(path, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    assert torch.equal(fresh[2].weight, a.weight)


def test_corrupt_data_names_the_tensor(tmp_path):
    _, path = _saved(tmp_path, PATTERNS[0])
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip a byte of the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(sc.FileFormatError, match="CRC-32"):
        sc.load(path, TinyNet())


def test_truncated_and_garbage_files(tmp_path):
    _, path = _saved(tmp_path, PATTERNS[1])
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(sc.FileFormatError, match="not a readable safetensors"):
        sc.load(path, TinyNet())
    path.write_bytes(b"\x80\x04\x95pickle-looking bytes")
    with pytest.raises(sc.FileFormatError, match="not a readable safetensors"):
        sc.read(path)
    with pytest.raises(FileNotFoundError):
        sc.read(tmp_path / "missing.safetensors")


def test_foreign_and_future_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(sc.FileFormatError, match="not a sparsecore model"):
        sc.read(foreign)
    _, path = _saved(tmp_path, PATTERNS[0])
    rewrite_header(path, lambda h: h.__setitem__("version", 99))
    with pytest.raises(sc.FileFormatError, match="version 99"):
        sc.read(path)


def test_skeleton_mismatch(tmp_path):
    _, path = _saved(tmp_path, PATTERNS[0])
    with pytest.raises(ValueError, match="no such module|weight shape|does not fit"):
        sc.load(path, nn.Sequential(nn.Linear(4, 4)))
    other = TinyNet()
    other.fc1 = nn.Linear(192, 39)  # narrower than the file: cannot be a slimmed skeleton
    with pytest.raises(ValueError, match="does not fit model weight shape"):
        sc.load(path, other)
