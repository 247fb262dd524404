"""Packed weight formats: N:M, unstructured, channel. ``FORMATS`` maps kind -> class."""
from .base import FORMATS, FormatError, PackedWeight, register_format, unregister_format
from .nm import NMWeight
from .unstructured import UnstructuredWeight
from .channel import ChannelWeight

__all__ = ["FORMATS", "FormatError", "PackedWeight", "register_format", "unregister_format", "NMWeight", "UnstructuredWeight",
           "ChannelWeight"]
