"""Model builders: torchvision-compatible ResNets (names, parameter counts) and the small test CNNs."""
import pytest
import torch
from torch import fx, nn

from sparsecore.models.cnn import mobilenet_small, vgg_small
from sparsecore.models.resnet import resnet18, resnet50


def _seed(g: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=g)))


@pytest.mark.parametrize("builder, params", [(resnet18, 11_689_512), (resnet50, 25_557_032)])
def test_resnet_matches_torchvision_parameter_count(builder, params):
    # torchvision's published counts for resnet18 / resnet50 (1000 classes).
    model = builder()
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet_module_names_are_torchvision_names():
    names = dict(resnet50().named_modules())
    r18 = resnet18()
    for fqn in ("conv1", "bn1", "layer1.0.conv3", "layer1.0.downsample.0", "layer1.0.downsample.1",
                "layer2.0.conv2", "layer4.2.bn3", "fc"):
        assert fqn in names, fqn
    assert names["layer2.0.conv2"].stride == (2, 2)   # v1.5: the stride sits on the 3x3 conv
    assert r18.layer1[0].downsample is None
    assert isinstance(r18.get_submodule("layer2.0.downsample.0"), nn.Conv2d)


# ResNet-50 is traced and run by tests/test_channel_slim.py; one ResNet here keeps the suite short.
@pytest.mark.parametrize("builder", [lambda: resnet18(num_classes=7, width=8), lambda: vgg_small(num_classes=7),
                                     lambda: mobilenet_small(num_classes=7)], ids=["resnet18", "vgg", "mobilenet"])
def test_small_models_run_and_trace(builder, seeded):
    _seed(seeded)
    model = builder().eval()
    x = torch.randn(2, 3, 32, 32, generator=seeded)
    with torch.no_grad():
        y = model(x)
        y_fx = fx.symbolic_trace(model)(x)
    assert y.shape == (2, 7) and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y_fx, y, rtol=0, atol=0)


def test_mobilenet_has_depthwise_and_residual():
    model = mobilenet_small()
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert any(getattr(m, "use_res", False) for m in model.modules())


def test_bad_width_raises():
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)
