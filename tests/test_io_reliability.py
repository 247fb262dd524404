"""save/load under bad input: conv geometry and the whole header checked, failed loads leave the skeleton
as it was, shared modules and tied weights round-trip, save errors name the user's path, umask modes."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsecore as sc
from helpers import rewrite_header
from sparsecore.channel.slim import is_slimmed
from sparsecore.formats.base import FormatError
from sparsecore.formats.unstructured import UnstructuredWeight, unpack_bits


def _conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2))


def _saved_conv(tmp_path):
    model = sc.sparsify(_conv_model(), sc.SparsityConfig("unstructured", 0.5))
    return model, sc.save(model, tmp_path / "c.safetensors", config=sc.SparsityConfig("unstructured", 0.5))


def _layer(field, value, layer="0"):
    return lambda h: h["layers"][layer]["conv"].__setitem__(field, value)


def test_padding_changed_in_the_file_is_caught(tmp_path):
    _, path = _saved_conv(tmp_path)
    raw = path.read_bytes()
    i = raw.index(b'padding\\": [1, 1]') + len(b'padding\\": [')  # the header is a JSON string inside JSON
    path.write_bytes(raw[:i] + b"0" + raw[i + 1:])
    with pytest.raises(sc.FileFormatError, match="header fails its CRC-32"):
        sc.load(path, _conv_model())


@pytest.mark.parametrize("field,value,layer", [("padding", [0, 1], "0"), ("stride", [1, 2], "2"),
                                               ("dilation", [1, 1], "2"), ("groups", 2, "2")])
def test_conv_geometry_compared_with_the_skeleton(tmp_path, field, value, layer):
    _, path = _saved_conv(tmp_path)
    rewrite_header(path, _layer(field, value, layer))  # a consistent file, but of another architecture
    skeleton = _conv_model()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(sc.SkeletonMismatchError, match=f"layer '{layer}'.*{field}"):
        sc.load(path, skeleton)
    assert all(type(m) is not sc.SparseConv2d for m in skeleton.modules())
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


@pytest.mark.parametrize("edit,match", [
    (_layer("stride", [0, 1]), "stride/dilation >= 1"),
    (_layer("dilation", [1, 0]), "stride/dilation >= 1"),
    (_layer("padding", [-1, 1]), "padding >= 0"),
    (lambda h: h["layers"].__setitem__("O", h["layers"].pop("0")), "no such module"),
    (lambda h: h["layers"]["0"]["packed"].__setitem__("shape", [8, 4, 3, 2]), "layer '0'"),
    (lambda h: h["layers"]["0"]["packed"].__setitem__("shape", [8, 4, 3, 4]), "layer '0'"),
    (lambda h: h.__setitem__("config", {"pattern": "unstructured", "sparsity": 7}), "config"),
    (lambda h: h.__setitem__("config", "unstructured"), "config"),
    (lambda h: h.__setitem__("torch", 2.1), "'torch' must be a version string"),
    (lambda h: h.__setitem__("sparsecore", "zero point one"), "'sparsecore' must be a version string"),
    (lambda h: h.__setitem__("slimmed", 1), "slimmed"),
    (lambda h: h.__setitem__("surprise", 1), "unknown"),
    (lambda h: h["layers"]["0"].__setitem__("padding", [0, 0]), "unknown header entry fields"),
])
def test_every_header_problem_is_a_file_format_error(tmp_path, edit, match):
    model, path = _saved_conv(tmp_path)
    rewrite_header(path, edit)
    skeleton = _conv_model()
    with pytest.raises(sc.FileFormatError, match=match):
        sc.load(path, skeleton)
    assert all(type(m) is not sc.SparseConv2d for m in skeleton.modules())


def test_failed_load_leaves_the_skeleton_exactly_as_it_was(tmp_path):
    model = sc.sparsify(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), sc.SparsityConfig("unstructured", 0.5),
                        filter_fn=lambda mod, fqn: fqn == "0")
    path = sc.save(model, tmp_path / "m.safetensors")
    skeleton = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))  # the dense layer differs
    layer0, params = skeleton[0], {k: (v, v.detach().clone()) for k, v in skeleton.named_parameters()}
    with pytest.raises(sc.SkeletonMismatchError, match="tensor '2.weight'"):
        sc.load(path, skeleton)
    assert skeleton[0] is layer0 and type(skeleton[0]) is nn.Linear
    for k, p in skeleton.named_parameters():
        assert p is params[k][0] and torch.equal(p, params[k][1]), k


def test_failed_slimmed_load_leaves_the_skeleton_unresized(tmp_path, seeded):
    def net(classes=10):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, classes)).eval()

    x = torch.randn(1, 3, 8, 8, generator=seeded)
    small = sc.sparsify(net(), sc.SparsityConfig("channel", 0.5), example_inputs=(x,), filter_fn=lambda m, f: f != "6")
    path = sc.save(small, tmp_path / "slim.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(sc.load(path, net())(x), small(x), rtol=1e-5, atol=1e-6)
    skeleton = net(classes=9)  # a narrower head: found only after the convs and BatchNorm were to be narrowed
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    with pytest.raises(sc.SkeletonMismatchError):
        sc.load(path, skeleton)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == shapes
    assert skeleton[0].out_channels == 8 and skeleton[1].num_features == 8 and skeleton[3].in_channels == 8
    assert not is_slimmed(skeleton)


def test_shared_module_round_trips(tmp_path, seeded):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = self.a
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    model = sc.sparsify(Shared(), sc.SparsityConfig("unstructured", 0.5))
    assert model.a is model.b
    path = sc.save(model, tmp_path / "s.safetensors")
    loaded = sc.load(path, Shared())
    assert isinstance(loaded.a, sc.SparseLinear) and loaded.a is loaded.b
    x = torch.randn(3, 16, generator=seeded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_tied_parameters_stay_tied(tmp_path, seeded):
    def tied():
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
        m[2].weight = m[0].weight
        return m

    model = sc.sparsify(tied(), sc.SparsityConfig("unstructured", 0.5), filter_fn=lambda mod, fqn: fqn == "3")
    path = sc.save(model, tmp_path / "t.safetensors")
    loaded = sc.load(path, tied())
    assert loaded[2].weight is loaded[0].weight and isinstance(loaded[0].weight, nn.Parameter)
    x = torch.randn(2, 8, generator=seeded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_version_1_files_still_load(tmp_path, seeded):
    import zlib
    model, path = _saved_conv(tmp_path)
    saved = sc.read(path)
    header = dict(saved.header, version=1)
    stored = {k: v for k, v in saved.tensors.items() if k not in header["aliases"]}
    header["crc32"] = {k: zlib.crc32(v.contiguous().view(torch.uint8).numpy().tobytes()) for k, v in stored.items()}
    old = tmp_path / "v1.safetensors"
    save_file(stored, str(old), metadata={"sparsecore": json.dumps(header)})
    x = torch.randn(1, 4, 9, 9, generator=seeded)
    with torch.no_grad():
        assert torch.equal(sc.load(old, _conv_model())(x), model(x))


def test_save_argument_errors_name_the_users_path(tmp_path):
    model = sc.sparsify(nn.Sequential(nn.Linear(8, 4)), sc.SparsityConfig("unstructured", 0.5))
    with pytest.raises(TypeError, match="config must be a SparsityConfig"):
        sc.save(model, tmp_path / "m.safetensors", config={"pattern": "unstructured"})
    missing = tmp_path / "no" / "such" / "dir" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        sc.save(model, missing)
    assert str(missing) in str(err.value) and ".tmp" not in str(err.value)
    with pytest.raises(IsADirectoryError, match="is a directory") as err:
        sc.save(model, tmp_path)
    assert str(tmp_path) in str(err.value)


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = sc.sparsify(nn.Sequential(nn.Linear(8, 4)), sc.SparsityConfig("unstructured", 0.5))
    path = sc.save(model, tmp_path / "m.safetensors")
    good = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left") as err:
        sc.save(model, path)
    assert str(path) in str(err.value) and ".tmp" not in str(err.value)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_file_mode_follows_the_umask(tmp_path, umask):
    model = sc.sparsify(nn.Sequential(nn.Linear(8, 4)), sc.SparsityConfig("unstructured", 0.5))
    old = os.umask(umask)
    try:
        path = sc.save(model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("shape", [(37, 200), (16, 128), (5, 33), (70, 31)])
def test_unstructured_word_checks_match_the_unpacked_bits(shape, seeded):
    from sparsecore.formats.unstructured import popcount32

    w = torch.randn(shape, generator=seeded)
    packed = UnstructuredWeight.from_dense(w, torch.rand(shape, generator=seeded) > 0.6)
    tensors, meta = packed.state()
    bits = unpack_bits(packed.bitmap)
    assert torch.equal(popcount32(packed.bitmap).sum(dim=(2, 3)), bits.sum(dim=(2, 3)))
    words = torch.randint(-2**31, 2**31 - 1, (1000,), generator=seeded, dtype=torch.int64).to(torch.int32)
    assert torch.equal(popcount32(words), unpack_bits(words.reshape(1, 1, 1, -1)).reshape(-1, 32).sum(-1))
    tn, tk, tile_n, tile_k = bits.shape
    for _ in range(20):  # one bit anywhere in the padded tiles: outside the matrix it is a padding error
        i, j, r, c = (int(torch.randint(0, d, (1,), generator=seeded)) for d in bits.shape)
        row, col = i * tile_n + r, j * tile_k + c
        if bits[i, j, r, c]:
            continue
        bitmap = packed.bitmap.clone()
        word = (int(bitmap[i, j, r, c // 32]) & 0xFFFFFFFF) | (1 << (c % 32))
        bitmap[i, j, r, c // 32] = word - 2**32 if word >= 2**31 else word
        outside = row >= shape[0] or col >= shape[1]
        with pytest.raises(FormatError, match="padding must be 0" if outside else "tile_offsets"):
            UnstructuredWeight.from_state(dict(tensors, bitmap=bitmap), meta)


def test_bare_layer_round_trip_leaves_the_skeleton_alone(tmp_path, seeded):
    sparse = sc.sparsify(nn.Linear(8, 4), sc.SparsityConfig("nm"))
    path = sc.save(sparse, tmp_path / "b.safetensors")
    skeleton = nn.Linear(8, 4)
    loaded = sc.load(path, skeleton)
    assert isinstance(loaded, sc.SparseLinear) and type(skeleton) is nn.Linear
    x = torch.randn(3, 8, generator=seeded)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))
    with pytest.raises(sc.SkeletonMismatchError, match="does not fit model weight shape"):
        sc.load(path, nn.Linear(8, 5))
