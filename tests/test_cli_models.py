"""``sparsecore prune --model``: torchvision names and local transformers folders, and the skeleton a file records."""
import sys
import types

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore import cli
from sparsecore.cli import zoo
from cli_helpers import no_interpreter_in_plans, run_cli as _run  # noqa: F401  (autouse fixture)




def _tiny_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))


@pytest.fixture
def fake_torchvision(monkeypatch, seeded):
    """A stand-in for ``torchvision.models`` (list_models / get_model), recording the calls it gets.

    get_model(..., weights=...) fills the weights from a fixed seed: 'pretrained' weights that are the same at
    every build, so that the test can rebuild what the CLI pruned.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeded))
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        if kwargs.get("weights"):
            torch.manual_seed(seed)
        return _tiny_net()

    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: ["tinynet", "other"]
    models.get_model = get_model
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls, seed


def test_torchvision_name_with_weights_round_trips(tmp_path, capsys, fake_torchvision):
    calls, seed = fake_torchvision
    out = tmp_path / "tv.safetensors"
    rc, text, err = _run(capsys, "prune", "--model", "tinynet", "--weights", "DEFAULT", "--pattern", "unstructured",
                         "--sparsity", "0.75", "--image-size", "8", "--plan", "--out", out)
    assert rc == 0, err
    assert calls[0] == ("tinynet", {"weights": "DEFAULT"})
    torch.manual_seed(seed)
    ref = _tiny_net()
    masks = sc.magnitude_masks(ref, sc.SparsityConfig("unstructured", 0.75))
    loaded = sc.load(out, cli.skeleton_from_file(out))
    assert calls[-1] == ("tinynet", {"weights": "DEFAULT"})  # the skeleton is rebuilt from the record
    mods = sc.sparse_modules(loaded)
    assert set(mods) == set(masks) == {"0", "3"}
    for fqn, mod in mods.items():
        w = ref.get_submodule(fqn).weight
        assert torch.equal(mod.dense_weight(), torch.where(masks[fqn], w, torch.zeros_like(w))), fqn
    rc, shown, err = _run(capsys, "inspect", out)
    assert rc == 0 and "skeleton: torchvision model 'tinynet' (weights='DEFAULT')" in shown, err


def test_torchvision_prefix_and_unknown_names(tmp_path, capsys, fake_torchvision):
    assert zoo.resolve("torchvision:tinynet") == zoo.ModelSpec("torchvision", "tinynet", {})
    with pytest.raises(cli.CLIError, match="not one of torchvision's 2 models"):
        zoo.resolve("nosuchnet")
    with pytest.raises(cli.CLIError, match="built-in models only"):
        zoo.resolve("tinynet", {"dim": 8})


def test_torchvision_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    rc, _, err = _run(capsys, "prune", "--model", "mobilenet_v2", "--random-init", "--pattern", "nm",
                      "--out", tmp_path / "o.safetensors")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pip install torchvision --index-url" in err and "CPU torch" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_transformers_folder_round_trips(tmp_path, capsys, bert_dir):
    import transformers

    out = tmp_path / "bert.safetensors"
    rc, text, err = _run(capsys, "prune", "--model", bert_dir, "--pattern", "nm", "--plan", "--seq", "8",
                         "--exclude", "pooler.*", "--out", out)
    assert rc == 0, err
    ref = transformers.AutoModel.from_pretrained(bert_dir, local_files_only=True)
    masks = sc.magnitude_masks(ref, sc.SparsityConfig("nm"), lambda mod, fqn: not fqn.startswith("pooler"))
    loaded = sc.load(out, cli.skeleton_from_file(out))
    mods = sc.sparse_modules(loaded)
    assert set(mods) == set(masks) and len(mods) == 6  # q, k, v, attention output, intermediate, output
    for fqn, mod in mods.items():
        w = ref.get_submodule(fqn).weight
        assert torch.equal(mod.dense_weight(), torch.where(masks[fqn], w, torch.zeros_like(w))), fqn
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        dense = sc.pruning.masked_copy(ref, masks)(input_ids=ids).last_hidden_state
        sparse = loaded(input_ids=ids).last_hidden_state
    torch.testing.assert_close(sparse.double(), dense, atol=1e-4, rtol=1e-4)


def test_transformers_missing_or_not_a_model_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc, _, err = _run(capsys, "prune", "--model", tmp_path / "m", "--pattern", "nm", "--out", tmp_path / "o")
    assert rc == 2 and "needs transformers" in err and "pip install transformers" in err
    rc, _, err = _run(capsys, "prune", "--model", tmp_path / "nothing", "--pattern", "nm", "--out", tmp_path / "o")
    assert rc == 2 and "not a transformers model folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_file_without_skeleton_record(tmp_path):
    path = sc.save(sc.sparsify(nn.Sequential(nn.Linear(8, 8)), sc.SparsityConfig("nm")), tmp_path / "api.safetensors")
    with pytest.raises(cli.CLIError, match="records no skeleton"):
        cli.skeleton_from_file(path)
