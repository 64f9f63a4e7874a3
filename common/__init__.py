"""Shared core of the concept-revival toolkit (see README and SPEC)."""
