"""Shared core of the concept-revival toolkit (see README.md)."""
