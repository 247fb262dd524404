"""The models the ``sparsecore`` command can build: built-in ones, torchvision names, local transformers folders.

A :class:`ModelSpec` names a model and the options it was built with. It is resolved (checked) before any work,
stored in the saved file's header as ``extra["skeleton"]``, and rebuilds the skeleton that ``sparsecore.load``
needs::

    from sparsecore.cli.zoo import skeleton_from_file
    model = sc.load("m.safetensors", skeleton_from_file("m.safetensors"))
"""
from __future__ import annotations

import importlib
import inspect as _inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CLIError

BUILTIN = ("mlp", "cnn", "resnet18", "resnet50", "decoder", "encoder")
# size options (--dim, --num-classes, ...) passed to the built-in builders that take them
SIZE_OPTIONS = ("dim", "hidden", "heads", "layers", "width", "num_classes", "in_features", "image_size")
TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_HELP = ("install torchvision built for the same torch, e.g. beside a CPU torch: pip install "
                    "torchvision --index-url <the PyTorch CPU wheel index> (see the README's set-up)")
TRANSFORMERS_HELP = "install it with: pip install transformers"


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``source`` is ``builtin``, ``torchvision`` or ``transformers`` (``name`` is then a folder)."""

    source: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Any) -> "ModelSpec":
        if not isinstance(record, dict) or not {"source", "name"} <= record.keys():
            raise CLIError(f"the file's skeleton record is not one this command wrote: {record!r}")
        return cls(str(record["source"]), str(record["name"]), dict(record.get("options") or {}))


def _mlp(in_features: int = 64, num_classes: int = 10, hidden: int = 128, layers: int = 2) -> nn.Module:
    """sparsecore.models.small.MLP with ``layers`` hidden layers of width ``hidden`` (digits-sized default)."""
    from ..models.small import MLP
    return MLP(in_features, num_classes, hidden=(hidden,) * layers)


def _cnn(num_classes: int = 10, width: int = 16, hidden: int = 64, image_size: int = 8) -> nn.Module:
    """sparsecore.models.small.SmallCNN on ``1 x S x S`` images, channels ``(width, 2 * width)``."""
    from ..models.small import SmallCNN
    return SmallCNN((1, image_size, image_size), num_classes, channels=(width, 2 * width), hidden=hidden)


def _builtin(name: str) -> Callable[..., nn.Module]:
    if name in ("decoder", "encoder"):
        from ..models import transformer
        return transformer.DecoderBlock if name == "decoder" else transformer.encoder
    if name in ("resnet18", "resnet50"):
        from ..models import resnet
        return getattr(resnet, name)
    return _mlp if name == "mlp" else _cnn


def _import(module: str, help_text: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CLIError(f"{what} needs {module.split('.')[0]}, which is not importable here ({e}); {help_text}") \
            from None


def resolve(name: str, options: dict[str, Any] | None = None, weights: str | None = None) -> ModelSpec:
    """Check that model ``name`` can be built, without building it.

    ``name``: a built-in model (:data:`BUILTIN`), a local transformers folder (one with ``config.json``), or a
    torchvision model name (``torchvision:NAME`` always means torchvision; a bare name that is neither of the
    others is looked up there). ``options``: size options of a built-in model. ``weights``: a torchvision
    weights name (e.g. ``DEFAULT``), downloaded by torchvision into its cache.
    """
    options = dict(options or {})
    if name in BUILTIN:
        if weights is not None:
            raise CLIError("--weights names torchvision weights; built-in models take --checkpoint")
        params = _inspect.signature(_builtin(name)).parameters
        bad = sorted(k for k in options if k not in params)
        if bad:
            takes = ", ".join("--" + p.replace("_", "-") for p in params if p in SIZE_OPTIONS) or "no size options"
            raise CLIError(f"model {name!r} does not take {', '.join('--' + b.replace('_', '-') for b in bad)}; "
                           f"it takes {takes}")
        return ModelSpec("builtin", name, options)
    if options:
        raise CLIError(f"size options ({', '.join('--' + k.replace('_', '-') for k in options)}) apply to the "
                       f"built-in models only, not to {name!r}")
    path = Path(name)
    if not name.startswith(TORCHVISION_PREFIX) and (path.is_dir() or "/" in name or name.startswith(".")):
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {name}: not a transformers model folder (no config.json in it)")
        if weights is not None:
            raise CLIError("--weights names torchvision weights; a transformers folder holds its own")
        _import("transformers", TRANSFORMERS_HELP, f"--model {name} (a transformers folder)")
        return ModelSpec("transformers", str(path.resolve()))
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    tv = _import("torchvision.models", TORCHVISION_HELP,
                 f"unknown model {name!r}: not built in ({', '.join(BUILTIN)}) nor a transformers folder, and "
                 f"looking it up among torchvision's models")
    known = tv.list_models()
    if tv_name not in known:
        raise CLIError(f"unknown model {name!r}: not built in ({', '.join(BUILTIN)}), not a transformers folder, "
                       f"and not one of torchvision's {len(known)} models (e.g. {', '.join(sorted(known)[:4])})")
    return ModelSpec("torchvision", tv_name, {"weights": weights} if weights else {})


def build(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` names, in eval mode (random init unless its source holds weights)."""
    if spec.source == "builtin":
        if spec.name not in BUILTIN:
            raise CLIError(f"unknown built-in model {spec.name!r}")
        return _builtin(spec.name)(**spec.options).eval()
    if spec.source == "torchvision":
        tv = _import("torchvision.models", TORCHVISION_HELP, f"model {spec.name!r}")
        return tv.get_model(spec.name, **spec.options).eval()
    if spec.source == "transformers":
        transformers = _import("transformers", TRANSFORMERS_HELP, f"model folder {spec.name}")
        try:
            return transformers.AutoModel.from_pretrained(spec.name, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise CLIError(f"transformers could not load {spec.name}: {e}") from None
    raise CLIError(f"unknown model source {spec.source!r} (expected builtin, torchvision or transformers)")


def has_own_weights(spec: ModelSpec) -> bool:
    """Whether building ``spec`` gives trained weights (a transformers folder, torchvision with ``weights``)."""
    return spec.source == "transformers" or bool(spec.options.get("weights"))


def example_inputs(spec: ModelSpec, model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device,
                   seq: int, image_size: int) -> tuple[torch.Tensor, ...]:
    """A random input batch for ``model``: transformers ``input_ids [B, seq]``, decoder ``[B, 1, dim]``
    (decode), encoder ``[B, seq, dim]``, conv nets ``[B, C_in, S, S]``, MLP ``[B, in_features]``."""
    if spec.source == "transformers":
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab < 1:
            raise CLIError(f"{spec.name}: its config has no vocab_size; pass --calibration with its inputs")
        return (torch.randint(0, vocab, (batch, seq), device=device),)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if first is None:
        raise CLIError(f"model {spec.name!r} has no Linear or Conv2d layer")
    if hasattr(model, "in_shape"):  # models that fix their input shape (SmallCNN)
        shape: tuple[int, ...] = (batch, *model.in_shape)
    elif isinstance(first, nn.Conv2d):
        shape = (batch, first.in_channels, image_size, image_size)
    elif spec.name in ("decoder", "encoder"):
        shape = (batch, 1 if spec.name == "decoder" else seq, first.in_features)
    else:
        shape = (batch, first.in_features)
    return (torch.randn(*shape, device=device).to(dtype),)


def spec_of_file(header_extra: dict[str, Any] | None, path: str | Path = "the file") -> ModelSpec:
    """The :class:`ModelSpec` a file made by ``sparsecore prune`` records, or a :class:`CLIError`."""
    record = (header_extra or {}).get("skeleton")
    if record is None:
        raise CLIError(f"{path} records no skeleton (it was not made by `sparsecore prune`); load it in Python "
                       f"with sparsecore.load(path, <your model>)")
    if "source" not in record and "model" in record:  # files of the first CLI: built-in models only
        record = {"source": "builtin", "name": record["model"], "options": record.get("options") or {}}
    return ModelSpec.from_json(record)


def skeleton_from_file(path: str | Path) -> nn.Module:
    """Rebuild the dense skeleton of a file made by ``sparsecore prune`` (pass it to ``sparsecore.load``)."""
    from ..io import read

    return build(spec_of_file(read(path).header.get("extra"), path))
