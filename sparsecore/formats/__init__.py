"""Packed weight formats. ``FORMATS`` maps kind -> class.

Every module of this package is imported here (``pkgutil``): a format is one file whose class is decorated
with ``@register_format`` (see ``base.PackedWeight`` for what it declares); nothing else is edited. The
built-in three come first, so ``FORMATS`` lists them in this order.
"""
import importlib
import pkgutil

from .base import FORMATS, FormatError, PackedWeight, register_format, unregister_format
from .nm import NMWeight
from .unstructured import UnstructuredWeight
from .channel import ChannelWeight

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FORMATS", "FormatError", "PackedWeight", "register_format", "unregister_format", "NMWeight",
           "UnstructuredWeight", "ChannelWeight"]
