"""Attention backends. Each is a function with the signature of :func:`reference.attention`.

Backends receive inputs that :func:`maskattn.attention` has already validated, and return
``(output, weights)`` where ``weights`` is None unless requested.
"""
