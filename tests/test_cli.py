"""The ``sparsecore`` command, run in-process: prune -> file -> inspect, numbers checked against the file's model."""
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import sparsecore as sc
from sparsecore.io import header_metadata
from sparsecore import cli
from sparsecore.models.resnet import resnet18
from sparsecore.models.transformer import DecoderBlock

DEC = ["--model", "decoder", "--dim", "32", "--hidden", "48", "--heads", "2"]
CASES = [(["--pattern", "nm"], sc.SparsityConfig("nm", n=2, m=4), "float32"),
         (["--pattern", "nm", "--n", "1", "--m", "8"], sc.SparsityConfig("nm", n=1, m=8), "float32"),
         (["--pattern", "unstructured", "--sparsity", "0.8"], sc.SparsityConfig("unstructured", 0.8), "float16"),
         (["--pattern", "channel", "--sparsity", "0.5"], sc.SparsityConfig("channel", 0.5), "bfloat16")]


@pytest.fixture(autouse=True)
def _no_interpreter_in_plans(monkeypatch):
    # Planning here would otherwise time Triton kernels under the (slow) interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


@pytest.mark.parametrize("args,config,dtype", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_prune_then_inspect_matches_the_saved_model(tmp_path, capsys, seeded, args, config, dtype):
    seed, out = _seed(seeded), tmp_path / "m.safetensors"
    torch.manual_seed(seed)
    rc, text, err = _run(capsys, "prune", *DEC, *args, "--dtype", dtype, "--out", out)
    assert rc == 0, err
    # The same random init, pruned by the library directly, is what the file must hold.
    torch.manual_seed(seed)
    ref = DecoderBlock(32, 48, 2).to(cli.DTYPES[dtype])
    masks = sc.magnitude_masks(ref, config)
    loaded = sc.load(out, DecoderBlock(32, 48, 2))
    mods = sc.sparse_modules(loaded)
    assert set(mods) == set(masks) and len(mods) == 7
    for fqn, mod in mods.items():
        w = ref.get_submodule(fqn).weight
        assert torch.equal(mod.dense_weight(), torch.where(masks[fqn], w, torch.zeros_like(w))), fqn

    rc, js, err = _run(capsys, "inspect", out, "--json")
    assert rc == 0, err
    report = json.loads(js)
    assert report["config"] == config.to_json()
    rows = {r["layer"]: r for r in report["layers"]}
    assert set(rows) == set(mods)
    for fqn, mod in mods.items():
        r, p = rows[fqn], mod.packed
        assert r["format"] == config.pattern and r["dtype"] == dtype and r["shape"] == list(p.shape)
        assert r["packed_bytes"] == p.nbytes and r["dense_bytes"] == p.dense_nbytes
        # kept weights are random normals (non-zero), so the mask's density is the count of non-zeros
        assert r["sparsity"] == pytest.approx(1 - int(masks[fqn].sum()) / masks[fqn].numel(), abs=1e-12)
        assert r["ratio"] == pytest.approx(p.dense_nbytes / p.nbytes)
    tot = report["totals"]
    assert tot["packed_bytes"] == sum(m.packed.nbytes for m in mods.values())
    assert tot["dense_bytes"] == sum(m.packed.dense_nbytes for m in mods.values())
    others = sum(t.numel() * t.element_size() for k, t in loaded.state_dict().items() if ".packed_" not in k)
    assert tot["other_bytes"] == others

    rc, table, err = _run(capsys, "inspect", out)
    assert rc == 0, err
    lines = {ln.split()[0]: ln for ln in table.splitlines() if ln.split() and ln.split()[0] in rows}
    assert set(lines) == set(rows)
    for fqn, r in rows.items():
        assert f"{r['sparsity']:.4f}" in lines[fqn].split() and f"{r['ratio']:.2f}x" in lines[fqn].split()
    assert text.splitlines()[-3] in table.splitlines()  # prune printed the same totals


def test_conv_model_channel_and_exclude(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc, text, err = _run(capsys, "prune", "--model", "resnet18", "--width", "4", "--num-classes", "5", "--pattern",
                         "channel", "--sparsity", "0.5", "--exclude", "fc", "--exclude", "conv1", "--out", out)
    assert rc == 0, err
    mods = sc.sparse_modules(sc.load(out, resnet18(num_classes=5, width=4)))
    assert "fc" not in mods and "conv1" not in mods and "layer1.0.conv1" in mods
    report = cli.file_report(out)
    assert {r["layer"] for r in report["layers"]} == set(mods)
    for r in report["layers"]:
        p = mods[r["layer"]].packed
        assert r["pattern"] == f"out {p.n_out}/{p.shape[0]} in {p.n_in}/{p.shape[1]}"
        assert r["sparsity"] == pytest.approx(1 - int(torch.count_nonzero(p.to_dense())) / p.to_dense().numel())


def test_checkpoint_is_what_gets_pruned(tmp_path, capsys, seeded):
    src = DecoderBlock(32, 48, 2)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded))
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ckpt))
    out = tmp_path / "m.safetensors"
    rc, _, err = _run(capsys, "prune", *DEC, "--pattern", "unstructured", "--sparsity", "0.5", "--checkpoint", ckpt,
                      "--out", out)
    assert rc == 0, err
    loaded = sc.load(out, DecoderBlock(32, 48, 2))
    masks = sc.magnitude_masks(src, sc.SparsityConfig("unstructured", 0.5))
    for fqn, mod in sc.sparse_modules(loaded).items():
        w = src.get_submodule(fqn).weight
        assert torch.equal(mod.dense_weight(), torch.where(masks[fqn], w, torch.zeros_like(w)))
    assert torch.equal(loaded.attn_norm.weight, src.attn_norm.weight)


def test_plan_reports_a_backend_per_layer(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, text, err = _run(capsys, "prune", *DEC, "--pattern", "unstructured", "--sparsity", "0.9", "--plan",
                         "--batch", "2", "--out", out)
    assert rc == 0, err
    header, *rows = [ln for ln in text.splitlines() if ln.startswith(("layer ", "attn.", "gate", "up", "down"))]
    assert header.split()[-1] == "backend" and len(rows) == 7
    names = {b.value for b in sc.Backend}
    assert "(unplanned)" not in text
    assert all(row.split()[-1] in names or (row.split()[-1] == "(cached)" and row.split()[-2] in names)
               for row in rows), text


@pytest.fixture
def bad_files(tmp_path):
    good_dir = tmp_path / "g"
    good_dir.mkdir()
    model = sc.sparsify(DecoderBlock(32, 48, 2), sc.SparsityConfig("nm"))
    good = sc.save(model, good_dir / "good.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    saved = sc.read(good)
    header = saved.header
    header["layers"]["gate_proj"]["packed"]["kind"] = "bogus"
    bogus = tmp_path / "bogus.safetensors"
    save_file({k: v for k, v in saved.tensors.items() if k not in header["aliases"]}, str(bogus),
              metadata=header_metadata(header))
    header["layers"]["gate_proj"]["packed"]["kind"] = "nm"
    header["layers"]["gate_proj"]["packed"]["shape"] = [48, 31]
    badshape = tmp_path / "badshape.safetensors"
    save_file({k: v for k, v in saved.tensors.items() if k not in header["aliases"]}, str(badshape),
              metadata=header_metadata(header))
    ckpt_bad = tmp_path / "ckpt.safetensors"
    save_file({"nonsense": torch.zeros(2)}, str(ckpt_bad))
    return {"junk": junk, "foreign": foreign, "trunc": trunc, "ckpt": ckpt_bad, "missing": tmp_path / "nope",
            "bogus": bogus, "badshape": badshape}


BAD = [
    (["inspect", "{missing}"], "no such file"),
    (["inspect", "{junk}"], "not a readable safetensors"),
    (["inspect", "{foreign}"], "not a sparsecore model"),
    (["inspect", "{trunc}"], "truncated or corrupt"),
    (["inspect", "{bogus}"], "layer 'gate_proj': unknown packed format 'bogus'"),
    (["inspect", "{badshape}"], "layer 'gate_proj'"),
    (["prune", *DEC, "--pattern", "nm", "--checkpoint", "{ckpt}", "--out", "{out}"], "does not fit this model"),
    (["prune", *DEC, "--pattern", "nm", "--checkpoint", "{missing}", "--out", "{out}"], "does not exist"),
    (["prune", "--model", "gpt5", "--pattern", "nm", "--out", "{out}"], "invalid choice"),
    (["prune", *DEC, "--pattern", "unstructured", "--sparsity", "1.5", "--out", "{out}"], "in [0, 1]"),
    (["prune", *DEC, "--pattern", "unstructured", "--out", "{out}"], "--sparsity is required"),
    (["prune", *DEC, "--pattern", "nm", "--sparsity", "0.9", "--out", "{out}"], "contradicts 2:4"),
    (["prune", *DEC, "--pattern", "nm", "--n", "3", "--m", "5", "--out", "{out}"], "m in (4, 8)"),
    (["prune", *DEC, "--pattern", "nm", "--method", "oracle", "--out", "{out}"], "unknown pruning method 'oracle'"),
    (["prune", *DEC, "--width", "8", "--pattern", "nm", "--out", "{out}"], "does not take --width"),
    (["prune", *DEC, "--pattern", "nm", "--exclude", "*", "--out", "{out}"], "no layer of 'decoder'"),
    (["prune", *DEC, "--pattern", "nm", "--backend", "triton_nm", "--plan", "--out", "{out}"], "triton"),
    (["prune", *DEC, "--pattern", "nm", "--batch", "0", "--out", "{out}"], "positive integer"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_arguments_and_files_exit_2_with_a_message(tmp_path, capsys, bad_files, argv, message):
    paths = {**{k: str(v) for k, v in bad_files.items()}, "out": str(tmp_path / "o.safetensors")}
    rc, out, err = _run(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2
    assert message.lower() in err.lower(), err
    assert "Traceback" not in err and "Traceback" not in out
    assert not (tmp_path / "o.safetensors").exists()


def test_training_methods_are_listed_not_run(tmp_path, capsys):
    methods = cli.available_methods()
    assert methods["magnitude"] is sc.magnitude_masks
    for name, fn in methods.items():
        if fn is None:  # e.g. gmp: needs a training loop
            rc, _, err = _run(capsys, "prune", *DEC, "--pattern", "nm", "--method", name, "--out", tmp_path / "o")
            assert rc == 2 and "needs training data" in err and "magnitude" in err


def test_bench_dispatch_forwards_arguments(monkeypatch, capsys, tmp_path):
    seen, results = [], [tmp_path / "table.md", 3]  # benches return a table path (success) or an exit code
    fake = types.ModuleType("bench.bench_models")
    fake.main = lambda argv: seen.append(argv) or results.pop(0)
    monkeypatch.syspath_prepend(str(cli._bench_root()))  # bench/ is a top-level folder, not in the package
    import bench
    monkeypatch.setitem(sys.modules, "bench.bench_models", fake)
    monkeypatch.setattr(bench, "bench_models", fake, raising=False)
    rc, _, err = _run(capsys, "bench", "models", "--quick", "--rep", "3")
    assert rc == 0, err
    assert seen == [["--quick", "--rep", "3"]]
    assert _run(capsys, "bench", "models")[0] == 3 and seen[1] == []
    monkeypatch.setitem(cli.BENCHES, "models", "bench_does_not_exist")
    rc, _, err = _run(capsys, "bench", "models")
    assert rc == 2 and "not present" in err


def test_demo_calls_the_demo_main(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("sparsecore.demo")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparsecore.demo", fake)
    rc, _, err = _run(capsys, "demo", "--steps", "2")
    assert rc == 0 and seen == [["--steps", "2"]], err


@pytest.mark.parametrize("model,args,skeleton", [
    ("mlp", ["--pattern", "nm", "--hidden", "32"], lambda: cli._mlp(hidden=32)),
    ("cnn", ["--pattern", "unstructured", "--sparsity", "0.7", "--width", "4"], lambda: cli._cnn(width=4)),
])
def test_small_models_round_trip(tmp_path, capsys, model, args, skeleton):
    out = tmp_path / "s.safetensors"
    rc, _, err = _run(capsys, "prune", "--model", model, *args, "--plan", "--batch", "3", "--out", out)
    assert rc == 0, err
    mods = sc.sparse_modules(sc.load(out, skeleton()))
    rows = {r["layer"]: r for r in cli.file_report(out)["layers"]}
    assert set(rows) == set(mods) and mods
    for fqn, mod in mods.items():
        dense = mod.dense_weight()
        assert rows[fqn]["sparsity"] == pytest.approx(1 - int(torch.count_nonzero(dense)) / dense.numel())
        assert rows[fqn]["packed_bytes"] == mod.packed.nbytes
