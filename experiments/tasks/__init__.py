"""Tasks by name: each takes a ``RunContext`` and returns a dict of results."""

from policies.registry import Registry

TASKS = Registry("task", "experiments.tasks", noun="name")
