"""The per-layer report the ``sparsecore`` command prints: sparse layers, skipped ones with their reason, slimming."""
import copy

import torch

import sparsecore as sc
from sparsecore.channel import slim_skipped
from sparsecore.cli import skeleton_from_file, zoo
from sparsecore.cli.table import fmt_bytes
from sparsecore.report import REPORT_KEY
from cli_helpers import no_interpreter_in_plans, run_cli, table_rows  # noqa: F401  (autouse fixture)
from helpers import SENet


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def test_prune_and_inspect_list_every_layer_with_kept_fraction_or_reason(tmp_path, capsys, seeded):
    seed, out = _seed(seeded), tmp_path / "c.safetensors"
    torch.manual_seed(seed)
    rc, text, err = run_cli(capsys, "prune", "--model", "cnn", "--width", "4", "--random-init", "--pattern", "nm",
                            "--out", out)
    assert rc == 0, err
    torch.manual_seed(seed)  # the same random init, pruned by the library: the masks the rows must describe
    masks = sc.magnitude_masks(zoo._cnn(width=4), sc.SparsityConfig("nm"))
    assert set(masks) == {"conv2", "fc", "head"}
    rc, shown, err = run_cli(capsys, "inspect", out)
    assert rc == 0, err
    for rows in (table_rows(text), table_rows(shown)):
        assert list(rows) == ["conv1", "conv2", "fc", "head"]
        for fqn, mask in masks.items():
            assert rows[fqn]["status"] == "sparse" and rows[fqn]["pattern"] == "nm 2:4"
            assert rows[fqn]["kept"] == f"{int(mask.sum()) / mask.numel():.3f}" and rows[fqn]["note"] == ""
        # conv1 reads one input channel with a 3x3 kernel: K = 9 is no multiple of 4
        assert rows["conv1"]["status"] == "skipped" and rows["conv1"]["kept"] == "-"
        assert rows["conv1"]["note"] == "N:M needs K % 4 == 0; K = 9"
        assert rows["conv1"]["shape"] == "4x1x3x3"
    assert "3 sparse, 1 skipped" in text and "3 sparse, 1 skipped" in shown


def test_brief_prints_each_reason_once_instead_of_rows(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc, text, err = run_cli(capsys, "prune", "--model", "resnet18", "--width", "4", "--num-classes", "5",
                            "--random-init", "--pattern", "nm", "--exclude", "layer1.*", "--out", out, "--brief")
    assert rc == 0, err
    assert not any(ln.startswith("layer ") for ln in text.splitlines())
    lines = text.splitlines()
    # ResNet-18 at width 4: conv1 (K = 3*7*7) cannot take 2:4; layer1 holds 4 convs, excluded.
    assert lines[0] == "16 sparse, 5 skipped"
    assert lines[1] == "  1 layer (conv1): N:M needs K % 4 == 0; K = 147"
    assert lines[2] == "  4 layers (layer1.0.conv1, layer1.0.conv2, layer1.1.conv1, layer1.1.conv2): excluded by filter_fn"
    rc, shown, err = run_cli(capsys, "inspect", out, "--brief")
    assert rc == 0, err
    assert "\n".join(lines[:3]) in shown
    rc, full, err = run_cli(capsys, "inspect", out)
    rows = table_rows(full)
    assert len(rows) == 21 and [f for f, r in rows.items() if r["status"] == "skipped"] == \
        ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]


def test_inspect_shows_slimmed_layers_and_why_others_kept_their_width(tmp_path, capsys, seeded):
    torch.manual_seed(_seed(seeded))
    model = SENet().eval()
    x = torch.randn(2, 3, 8, 8, generator=seeded)
    masks = {"c1": torch.arange(8) % 2 == 0, "c2": torch.arange(8) < 4, "c3": torch.arange(6) < 3}
    weight_masks = {f: m[:, None, None, None].expand_as(model.get_submodule(f).weight) for f, m in masks.items()}
    small = sc.sparsify(copy.deepcopy(model), sc.SparsityConfig("channel"), masks=weight_masks, example_inputs=(x,))
    path = sc.save(small, tmp_path / "se.safetensors", extra={REPORT_KEY: sc.last_report(small).to_json()})
    rc, text, err = run_cli(capsys, "inspect", path)
    assert rc == 0, err
    rows = table_rows(text)
    assert list(rows) == ["c1", "c2", "se", "c3", "fc"]
    # c2 was masked, but the SE multiply pins its channels: it keeps its width, packed, zeroed rows and all
    assert rows["c2"]["status"] == "sparse" and rows["c2"]["pattern"] == "channel out 4/8 in 4/8"
    assert rows["c2"]["kept"] == f"{(4 * 4) / (8 * 8):.3f}" and "cannot see through" in rows["c2"]["note"]
    assert rows["c1"]["status"] == rows["c3"]["status"] == "slimmed" and rows["c1"]["note"] == rows["c3"]["note"] == ""
    assert rows["c3"]["shape"] == "6x8x3x3->3x4x3x3" and rows["c3"]["kept"] == f"{(3 * 4) / (6 * 8):.3f}"
    pinned = slim_skipped(small)
    assert set(pinned) == {"c2", "se", "fc"}
    assert rows["se"]["note"] == f"no mask given; {pinned['se']}"
    assert rows["fc"]["note"].startswith("output layer: excluded from channel pruning") and pinned["fc"] in rows["fc"]["note"]


def test_inspect_rejects_a_file_whose_recorded_report_is_not_one(tmp_path, capsys):
    model = sc.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), sc.SparsityConfig("nm"))
    path = sc.save(model, tmp_path / "m.safetensors", extra={REPORT_KEY: [{"layer": "0"}]})
    rc, out, err = run_cli(capsys, "inspect", path)
    assert rc == 2 and "not a layer report" in err and len(err.splitlines()) == 1
    plain = sc.save(model, tmp_path / "p.safetensors")  # no recorded report: the packed layers alone
    rc, out, err = run_cli(capsys, "inspect", plain)
    assert rc == 0 and list(table_rows(out)) == ["0"] and "1 sparse, 0 skipped" in out


def test_prune_slim_writes_a_smaller_model_and_reports_each_layer(tmp_path, capsys, seeded):
    seed, out = _seed(seeded), tmp_path / "s.safetensors"
    torch.manual_seed(seed)
    rc, text, err = run_cli(capsys, "prune", "--model", "resnet18", "--width", "4", "--num-classes", "5",
                            "--random-init", "--pattern", "channel", "--sparsity", "0.5", "--slim", "--image-size", "32",
                            "--out", out)
    assert rc == 0, err
    torch.manual_seed(seed)
    dense = zoo.build(zoo.resolve("resnet18", {"width": 4, "num_classes": 5}))
    ref = sc.sparsify(copy.deepcopy(dense), sc.SparsityConfig("channel", 0.5), example_inputs=(torch.randn(1, 3, 32, 32),))
    loaded = sc.load(out, skeleton_from_file(out))
    want = ref.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    rows = table_rows(text)
    convs = [f for f, m in dense.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert list(rows) == convs and "0 sparse, 21 slimmed, 0 skipped" in text
    for fqn in convs:
        before, after = dense.get_submodule(fqn).weight, loaded.get_submodule(fqn).weight
        assert rows[fqn]["status"] == "slimmed" and rows[fqn]["kept"] == f"{after.numel() / before.numel():.3f}"
        assert rows[fqn]["shape"] == "x".join(map(str, before.shape)) + "->" + "x".join(map(str, after.shape))
    assert [f for f, r in rows.items() if r["note"]] == ["fc"] and slim_skipped(ref)["fc"] in rows["fc"]["note"]
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert f"whole model:   {fmt_bytes(nbytes(loaded))} vs dense {fmt_bytes(nbytes(dense))}" in text
    rc, shown, err = run_cli(capsys, "inspect", out)
    assert rc == 0 and table_rows(shown) == rows, err
    rc, _, err = run_cli(capsys, "prune", "--model", "mlp", "--random-init", "--pattern", "nm", "--slim",
                         "--out", tmp_path / "x.safetensors")
    assert rc == 2 and "--slim removes channels: it needs --pattern channel" in err


def test_brief_with_plan_counts_the_backends_chosen(tmp_path, capsys):
    rc, text, err = run_cli(capsys, "prune", "--model", "mlp", "--hidden", "16", "--in-features", "16", "--random-init",
                            "--pattern", "unstructured", "--sparsity", "0.9", "--plan", "--batch", "2",
                            "--out", tmp_path / "m.safetensors", "--brief")
    assert rc == 0, err
    line = next(ln for ln in text.splitlines() if ln.startswith("  backends chosen: "))
    counts = [item.rsplit(" x", 1) for item in line.removeprefix("  backends chosen: ").split(", ")]
    assert all(name in {b.value for b in sc.Backend} for name, _ in counts)
    assert sum(int(n) for _, n in counts) == 3  # three layers, one batch bucket each
