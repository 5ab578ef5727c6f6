"""Policies swappable by name: eviction, quantization calibration, store tiers."""

from policies.registry import CALIBRATION, EVICTION, TIER, Registry, parse_spec

__all__ = ["CALIBRATION", "EVICTION", "TIER", "Registry", "parse_spec"]
