"""Checks of layer constructor arguments, so that a bad one is refused by name when the layer is built."""

from __future__ import annotations

import math
import numbers


def check_layer_arguments(owner: str, *, sizes: dict[str, object] | None = None,
                          switches: dict[str, object] | None = None,
                          probabilities: dict[str, object] | None = None,
                          positive: dict[str, object] | None = None) -> None:
    """Raise a ValueError naming ``owner``, the argument, its value and what was expected for the first bad one.

    ``sizes``: positive ints (not bools); ``switches``: True or False (a string "no" or a 0 is not read as one);
    ``probabilities``: numbers in [0, 1); ``positive``: finite numbers > 0 (an epsilon).
    """
    for name, value in (sizes or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    for name, value in (switches or {}).items():
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    for name, value in (probabilities or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")
    for name, value in (positive or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
