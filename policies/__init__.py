"""Policies swappable by name: eviction, quantization calibration, and the
replacement rules of the store's tiers."""

from policies.registry import (CALIBRATION, EVICTION, REPLACEMENT, Registry,
                               parse_spec)

__all__ = ["CALIBRATION", "EVICTION", "REPLACEMENT", "Registry", "parse_spec"]
