"""Backends for the channel format (filled in by its owner)."""
