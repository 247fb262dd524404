"""The ``sparsecore`` command, run in-process: prune -> file -> inspect, numbers checked against the file's model."""
import json

import pytest
import torch
from safetensors.torch import save_file

import sparsecore as sc
from sparsecore import layers
from sparsecore.io import header_metadata
from sparsecore import cli
from sparsecore.cli import cmd_prune, methods, zoo
from sparsecore.models.resnet import resnet18
from sparsecore.models.transformer import DecoderBlock
from cli_helpers import no_interpreter_in_plans, run_cli as _run, table_rows  # noqa: F401  (autouse fixture)
from sparsecore.cli.table import fmt_bytes

DEC = ["--model", "decoder", "--dim", "32", "--hidden", "48", "--heads", "2"]
RND = [*DEC, "--random-init"]
CASES = [(["--pattern", "nm"], sc.SparsityConfig("nm", n=2, m=4), "float32"),
         (["--pattern", "nm", "--n", "1", "--m", "8"], sc.SparsityConfig("nm", n=1, m=8), "float32"),
         (["--pattern", "unstructured", "--sparsity", "0.8"], sc.SparsityConfig("unstructured", 0.8), "float16"),
         (["--pattern", "channel", "--sparsity", "0.5"], sc.SparsityConfig("channel", 0.5), "bfloat16")]




def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


@pytest.mark.parametrize("args,config,dtype", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_prune_then_inspect_matches_the_saved_model(tmp_path, capsys, seeded, args, config, dtype):
    seed, out = _seed(seeded), tmp_path / "m.safetensors"
    torch.manual_seed(seed)
    rc, text, err = _run(capsys, "prune", *RND, *args, "--dtype", dtype, "--out", out)
    assert rc == 0, err
    # The same random init, pruned by the library directly, is what the file must hold.
    torch.manual_seed(seed)
    ref = DecoderBlock(32, 48, 2).to(cmd_prune.DTYPES[dtype])
    masks = sc.magnitude_masks(ref, config)
    loaded = sc.load(out, DecoderBlock(32, 48, 2))
    mods = sc.sparse_modules(loaded)
    assert set(mods) == set(masks) and len(mods) == 7
    rebuilt = sc.load(out, cli.skeleton_from_file(out))  # the skeleton the file records
    assert rebuilt.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in loaded.state_dict().items())
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
        assert r["pattern"] == config.pattern and r["dtype"] == dtype and r["shape"] == list(p.shape)
        assert r["status"] == "sparse" and r["reason"] == ""
        assert r["packed_bytes"] == p.nbytes and r["dense_bytes"] == p.dense_nbytes
        assert r["kept"] == pytest.approx(int(masks[fqn].sum()) / masks[fqn].numel(), abs=1e-12)
        assert r["ratio"] == pytest.approx(p.dense_nbytes / p.nbytes)
    tot = report["totals"]
    assert tot["packed_bytes"] == sum(m.packed.nbytes for m in mods.values())
    assert tot["dense_bytes"] == sum(m.packed.dense_nbytes for m in mods.values())
    others = sum(t.numel() * t.element_size() for k, t in loaded.state_dict().items() if ".packed_" not in k)
    assert tot["other_bytes"] == others

    rc, table, err = _run(capsys, "inspect", out)
    assert rc == 0, err
    cells = table_rows(table)
    assert set(cells) == set(rows) and table_rows(text) == cells  # prune printed the same table
    for fqn, r in rows.items():
        kept = int(masks[fqn].sum()) / masks[fqn].numel()
        assert cells[fqn]["kept"] == f"{kept:.3f}" and cells[fqn]["status"] == "sparse"
        assert cells[fqn]["packed"] == fmt_bytes(r["packed_bytes"]) and cells[fqn]["dense"] == fmt_bytes(r["dense_bytes"])
        assert cells[fqn]["pattern"].split()[0] == config.pattern
        if config.pattern == "nm":
            assert cells[fqn]["pattern"] == f"nm {config.n}:{config.m}"
    assert text.splitlines()[-3] in table.splitlines()  # prune printed the same totals


def test_conv_model_channel_and_exclude(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc, text, err = _run(capsys, "prune", "--model", "resnet18", "--width", "4", "--num-classes", "5", "--random-init", "--pattern",
                         "channel", "--sparsity", "0.5", "--exclude", "fc", "--exclude", "conv1", "--out", out)
    assert rc == 0, err
    mods = sc.sparse_modules(sc.load(out, resnet18(num_classes=5, width=4)))
    assert "fc" not in mods and "conv1" not in mods and "layer1.0.conv1" in mods
    report = cli.file_report(out)
    assert {r["layer"] for r in report["layers"] if r["status"] == "sparse"} == set(mods)
    reasons = {r["layer"]: r["reason"] for r in report["layers"] if r["status"] == "skipped"}
    assert reasons == {"conv1": "excluded by filter_fn", "fc": layers.OUTPUT_SKIP}  # fc: the head is never pruned
    for r in report["layers"]:
        if r["status"] != "sparse":
            continue
        p = mods[r["layer"]].packed
        assert r["pattern"] == "channel" and r["layout"] == f"out {p.n_out}/{p.shape[0]} in {p.n_in}/{p.shape[1]}"
        assert r["kept"] == pytest.approx(int(torch.count_nonzero(p.to_dense())) / p.to_dense().numel())


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
    rc, text, err = _run(capsys, "prune", *RND, "--pattern", "unstructured", "--sparsity", "0.9", "--plan",
                         "--batch", "2", "--out", out)
    assert rc == 0, err
    rows = table_rows(text)
    assert len(rows) == 7 and "(unplanned)" not in text
    names = {b.value for b in sc.Backend}
    for fqn, row in rows.items():
        assert row["backend"].startswith("M<=2: ") and row["backend"][len("M<=2: "):] in names, row
        speed = row["vs dense [q25-q75]"]  # "1.00x" for dense, "2.31x [2.10-2.40]" for a sparse choice
        assert speed == "1.00x" if row["backend"] == "M<=2: dense" else speed.endswith("]"), row


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
            "good": good,
            "bogus": bogus, "badshape": badshape}


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
BAD = [
    (["inspect", "{missing}"], "no such file"),
    (["inspect", "{junk}"], "not a readable safetensors"),
    (["inspect", "{foreign}"], "not a sparsecore model"),
    (["inspect", "{trunc}"], "truncated or corrupt"),
    (["inspect", "{bogus}"], "layer 'gate_proj': unknown packed format 'bogus'"),
    (["inspect", "{badshape}"], "layer 'gate_proj'"),
    (["inspect", "{tmp}"], "is a directory"),
    (["prune", *DEC, "--pattern", "nm", "--checkpoint", "{ckpt}", "--out", "{out}"], "does not fit this model"),
    (["prune", *DEC, "--pattern", "nm", "--checkpoint", "{missing}", "--out", "{out}"], "does not exist"),
    (["prune", "--model", "gpt5", "--random-init", "--pattern", "nm", "--out", "{out}"], "unknown model 'gpt5'"),
    (["prune", *RND, "--pattern", "unstructured", "--sparsity", "1.5", "--out", "{out}"], "in [0, 1]"),
    (["prune", *RND, "--pattern", "unstructured", "--out", "{out}"], "--sparsity is required"),
    (["prune", *RND, "--pattern", "nm", "--sparsity", "0.9", "--out", "{out}"], "contradicts 2:4"),
    (["prune", *RND, "--pattern", "nm", "--n", "3", "--m", "5", "--out", "{out}"], "m in (4, 8)"),
    (["prune", *RND, "--pattern", "nm", "--method", "oracle", "--out", "{out}"], "invalid choice: 'oracle'"),
    (["prune", *RND, "--pattern", "nm", "--method", "gmp", "--out", "{out}"], "choose from 'magnitude'"),
    (["prune", *RND, "--width", "8", "--pattern", "nm", "--out", "{out}"], "does not take --width"),
    (["prune", *RND, "--pattern", "nm", "--exclude", "*", "--out", "{out}"], "no layer of 'decoder'"),
    (["prune", *RND, "--pattern", "nm", "--backend", "triton_nm", "--plan", "--out", "{out}"], "triton"),
    (["prune", *RND, "--pattern", "nm", "--batch", "0", "--out", "{out}"], "positive integer"),
    (["prune", *DEC, "--pattern", "nm", "--out", "{out}"], "--random-init"),
    (["prune", *RND, "--checkpoint", "{ckpt}", "--pattern", "nm", "--out", "{out}"], "give one of"),
    (["prune", *RND, "--pattern", "nm", "--calibration", "{ckpt}", "--out", "{out}"], "magnitude is data-free"),
    (["prune", *RND, "--pattern", "nm", "--device", "tpu", "--out", "{out}"], "--device must be cpu"),
    pytest.param(["prune", *RND, "--pattern", "nm", "--device", "cuda", "--out", "{out}"], "no CUDA device",
                 marks=NO_CUDA),
    (["prune", *RND, "--pattern", "nm", "--out", "{tmp}/no/such/dir/o.safetensors"], "does not exist"),
    (["prune", *RND, "--pattern", "nm", "--out", "{tmp}"], "is a directory"),
    (["prune", *RND, "--pattern", "nm", "--out", "{junk}/o.safetensors"], "is not a directory"),
    (["prune", "--model", "{tmp}", "--pattern", "nm", "--out", "{out}"], "no config.json"),
    (["bench", "{missing}"], "does not exist"),
    (["bench", "{good}", "--out", "{out}"], "records no skeleton"),
    (["bench", "{good}", "--rep", "0"], "positive integer"),
    (["bench", "{good}", "--device", "tpu", "--out", "{out}"], "--device must be cpu"),
    (["bench", "{good}", "--out", "{tmp}/no/such/dir/o.csv"], "does not exist"),
    (["demo", "--rep", "0"], "positive integer"),
    (["demo", "--device", "tpu"], "--device must be cpu"),
    pytest.param(["demo", "--device", "cuda"], "no CUDA device", marks=NO_CUDA),
    (["demo", "--steps", "2"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
]


def _ids(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return argv[0]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{_ids(c)}-{i}" for i, c in enumerate(BAD)])
def test_bad_arguments_and_files_exit_2_with_one_line(tmp_path, capsys, bad_files, argv, message):
    paths = {**{k: str(v) for k, v in bad_files.items()}, "out": str(tmp_path / "o.safetensors"),
             "tmp": str(tmp_path)}
    before = sorted(tmp_path.rglob("*"))
    rc, out, err = _run(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2
    assert message.lower() in err.lower(), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparsecore: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing left behind


@pytest.mark.parametrize("out", ["{tmp}/missing/o.safetensors", "{tmp}"])
def test_bad_out_is_reported_before_any_work(tmp_path, capsys, monkeypatch, out):
    calls = []
    monkeypatch.setattr(zoo, "build", lambda *a, **k: calls.append("build"))
    monkeypatch.setitem(methods.ONESHOT, "magnitude", methods.Method("magnitude", "recording", False,
                                                                      lambda *a: calls.append("prune") or {}))
    monkeypatch.setattr(sc, "sparsify", lambda *a, **k: calls.append("sparsify"))
    rc, _, err = _run(capsys, "prune", *RND, "--pattern", "nm", "--out", out.format(tmp=tmp_path))
    assert rc == 2 and calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,options", [
    ([], ["prune", "inspect", "bench", "demo", "--traceback"]),
    (["prune"], ["--model", "--pattern", "--method", "magnitude", "GMP", "PSAP", "--random-init", "--checkpoint",
                 "--weights", "torchvision", "transformers", "--out", "--plan", "--exclude", "--brief"]),
    (["inspect"], ["file", "--json", "--brief"]),
    (["bench"], ["file", "--batch", "--rep", "--out", "--device"]),
    (["demo"], ["--small", "--rep", "--device"]),
])
def test_help_lists_each_subcommands_options(capsys, command, options):
    rc, out, err = _run(capsys, *command, "--help")
    assert rc == 0 and err == ""
    for opt in options:
        assert opt in out, (opt, out)


@pytest.mark.parametrize("model,args,skeleton", [
    ("mlp", ["--pattern", "nm", "--hidden", "32"], lambda: zoo._mlp(hidden=32)),
    ("cnn", ["--pattern", "unstructured", "--sparsity", "0.7", "--width", "4"], lambda: zoo._cnn(width=4)),
])
def test_small_models_round_trip(tmp_path, capsys, model, args, skeleton):
    out = tmp_path / "s.safetensors"
    rc, _, err = _run(capsys, "prune", "--model", model, *args, "--random-init", "--plan", "--batch", "3", "--out", out)
    assert rc == 0, err
    mods = sc.sparse_modules(sc.load(out, skeleton()))
    rows = {r["layer"]: r for r in cli.file_report(out)["layers"] if r["status"] == "sparse"}
    assert set(rows) == set(mods) and mods
    for fqn, mod in mods.items():
        dense = mod.dense_weight()
        assert rows[fqn]["kept"] == pytest.approx(int(torch.count_nonzero(dense)) / dense.numel())
        assert rows[fqn]["packed_bytes"] == mod.packed.nbytes


@pytest.fixture
def recording_method(monkeypatch):
    """A one-shot method that uses activations: records its calibration and prunes by magnitude."""
    seen = []

    def masks(model, config, filter_fn, calibration):
        seen.append(calibration)
        return sc.magnitude_masks(model, config, filter_fn)

    monkeypatch.setitem(methods.ONESHOT, "actaware", methods.Method("actaware", "test", True, masks))
    return seen


def test_calibration_file_reaches_the_method(tmp_path, capsys, recording_method, seeded):
    inputs = torch.randn(5, 64, generator=seeded, dtype=torch.float64)
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": inputs, "weights": torch.ones(5)}, str(calib))
    rc, _, err = _run(capsys, "prune", "--model", "mlp", "--random-init", "--pattern", "nm", "--method", "actaware",
                      "--calibration", calib, "--out", tmp_path / "m.safetensors")
    assert rc == 0, err
    (args, kwargs), = recording_method
    assert len(args) == 1 and args[0].dtype == torch.float32 and torch.equal(args[0], inputs.float())
    assert list(kwargs) == ["weights"] and torch.equal(kwargs["weights"], torch.ones(5))
    rc, _, err = _run(capsys, "prune", "--model", "mlp", "--random-init", "--pattern", "nm", "--method", "actaware",
                      "--batch", "3", "--out", tmp_path / "n.safetensors")
    assert rc == 0, err
    (args, kwargs) = recording_method[1]  # no file: the random example batch
    assert args[0].shape == (3, 64) and kwargs == {}


@pytest.mark.parametrize("tensors,message", [({"x": torch.zeros(2, 64)}, "no tensor named 'inputs'"),
                                             ({"inputs": torch.zeros(2, 64), "m": torch.zeros(3)}, "has 3 rows"),
                                             (None, "not a readable safetensors")])
def test_bad_calibration_file_is_reported_before_any_work(tmp_path, capsys, monkeypatch, recording_method,
                                                           tensors, message):
    calib = tmp_path / "calib.safetensors"
    if tensors is None:
        calib.write_bytes(b"junk")
    else:
        save_file(tensors, str(calib))
    monkeypatch.setattr(zoo, "build", lambda *a, **k: pytest.fail("built a model before checking --calibration"))
    rc, _, err = _run(capsys, "prune", "--model", "mlp", "--random-init", "--pattern", "nm", "--method", "actaware",
                      "--calibration", calib, "--out", tmp_path / "m.safetensors")
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert recording_method == [] and sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]



@pytest.mark.parametrize("pattern", [["--pattern", "unstructured", "--sparsity", "0.6"], ["--pattern", "nm"]])
def test_wanda_uses_the_calibration_file(tmp_path, capsys, seeded, pattern):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeded))
    inputs = torch.randn(20, 64, generator=seeded) * torch.rand(64, generator=seeded) * 4  # uneven feature norms
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": inputs}, str(calib))
    out = tmp_path / "w.safetensors"
    torch.manual_seed(seed)
    rc, _, err = _run(capsys, "prune", "--model", "mlp", "--hidden", "32", "--random-init", *pattern,
                      "--method", "wanda", "--calibration", calib, "--out", out)
    assert rc == 0, err
    torch.manual_seed(seed)
    ref = zoo._mlp(hidden=32)
    config = sc.SparsityConfig(pattern[1], float(pattern[3]) if len(pattern) > 2 else 0.5)
    masks = sc.wanda_masks(ref, [inputs[:16], inputs[16:]], config)  # the CLI's 16-row batches
    magnitude = sc.magnitude_masks(ref, config)
    assert any(not torch.equal(m, magnitude[f]) for f, m in masks.items() if f in magnitude)  # calibration mattered
    mods = sc.sparse_modules(sc.load(out, cli.skeleton_from_file(out)))
    assert set(mods) == set(masks)
    for fqn, mod in mods.items():
        w = ref.get_submodule(fqn).weight
        assert torch.equal(mod.dense_weight(), torch.where(masks[fqn], w, torch.zeros_like(w))), fqn
