"""Moved to `unmask.frontend.params` (parameter resolution is the frontend's job); kept as an alias."""
from ..frontend.params import POLICY_DEFAULTS, Resolved, SamplingParams, resolve  # noqa: F401
