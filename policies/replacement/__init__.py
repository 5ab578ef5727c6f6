"""Replacement rules of the store's tiers, one per file; each registers itself
on import."""
