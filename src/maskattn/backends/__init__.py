"""Attention backends. Each is a function with the signature of :class:`registry.AttentionFn`, described
by one :class:`registry.Backend` record (its module's ``BACKEND``) registered below.

Backends receive inputs that :func:`maskattn.attention` has already validated, and return
``(output, weights)`` where ``weights`` is None unless requested. To add one, see CONTRIBUTING.md.
"""

from maskattn.backends import blocked_op, flex, reference, sdpa
from maskattn.backends.registry import REGISTRY, AttentionFn, Backend, Call, get, register

__all__ = ["REGISTRY", "AttentionFn", "Backend", "Call", "get", "register"]

# blocked_op.BACKEND is blocked's record whose function runs it as one custom operator while torch.compile traces.
for _module in (reference, sdpa, blocked_op, flex):  # the order of preference, in which explain lists them
    register(_module.BACKEND)
