"""Seeded, bounded fuzzing of saved files: every single-byte or single-digit change of a file must either
raise ``FileFormatError`` or load a model whose output is bit-identical to the saved model's."""
import struct

import pytest
import torch
from torch import nn

import sparsecore as sc


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=(1, 0), dilation=(1, 2)),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 3 * 1, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("config", [sc.SparsityConfig("unstructured", 0.5), sc.SparsityConfig("nm", n=2, m=4)],
                         ids=lambda c: c.pattern)
def test_single_changes_are_caught_or_harmless(tmp_path, config):
    gen = torch.Generator().manual_seed(1234)  # fixed: the same mutations on every run
    torch.manual_seed(0)
    model = sc.sparsify(_model(), config)
    path = sc.save(model, tmp_path / "m.safetensors", config=config, extra={"name": "fuzz", "width": 8})
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with torch.no_grad():
        want = model(x)
    raw = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    digits = [i for i in range(header_end) if 48 <= raw[i] <= 57]
    outcomes = {"error": 0, "same": 0}
    for trial in range(300):
        data = bytearray(raw)
        r = int(torch.randint(0, 10, (1,), generator=gen))
        if r < 5:  # a digit of the headers (shapes, offsets, geometry, CRCs, versions) becomes another digit
            i = digits[int(torch.randint(0, len(digits), (1,), generator=gen))]
            data[i] = 48 + (data[i] - 48 + int(torch.randint(1, 10, (1,), generator=gen))) % 10
        else:  # any byte of the file (headers weighted as much as the data) gets bits flipped
            span = header_end if r < 8 else len(raw)
            i = int(torch.randint(0, span, (1,), generator=gen))
            data[i] ^= int(torch.randint(1, 256, (1,), generator=gen))
        path.write_bytes(bytes(data))
        try:
            loaded = sc.load(path, _model())
        except sc.FileFormatError:
            outcomes["error"] += 1
            continue
        with torch.no_grad():
            got = loaded(x)
        assert got.shape == want.shape and torch.equal(got, want), f"trial {trial}: byte {i} changed, output differs"
        outcomes["same"] += 1
    assert outcomes["error"] > 250, outcomes  # nearly every change is detected, not merely harmless
