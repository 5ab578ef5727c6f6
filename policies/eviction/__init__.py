"""Eviction policies, one per file; each registers itself on import."""
