"""What a tier policy is: bookkeeping of one tier's keys that names the next victim.

A tier calls ``insert`` when a chunk arrives, ``touch`` on every hit,
``remove`` when a chunk leaves for any reason, and ``victim`` when it needs
room. Policies are not thread-safe; the tier holds its lock around them.
"""

from __future__ import annotations

from typing import Hashable, Protocol


class TierPolicy(Protocol):
  name: str

  def insert(self, key: Hashable) -> None: ...

  def touch(self, key: Hashable) -> None: ...

  def remove(self, key: Hashable) -> None: ...

  def victim(self) -> Hashable:
    """The key to evict next; only called while at least one key is held."""
