"""The embedded default task: human-written dates to ISO 8601, generated here, deterministic from a seed.

``"Tuesday, 3rd of March 1998"``, ``"03/03/1998"``, ``"Mar 3, 1998"`` ... -> ``"1998-03-03"``.
Every format is unambiguous (numeric dates are always day/month/year), so a model can be exact.
"""

from __future__ import annotations

import datetime as dt
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST, LAST = dt.date(1900, 1, 1).toordinal(), dt.date(2099, 12, 31).toordinal()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


FORMATS = [
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",
    lambda d: f"{d.day}.{d.month}.{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{DAYS[d.weekday()]}, {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1].lower()}, {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].upper()}-{d.year}",
    lambda d: f"{MONTHS[d.month - 1].upper()} {_ordinal(d.day)} {d.year}",
]


def generate(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (human date, ISO date) pairs, the same for the same seed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        day = dt.date.fromordinal(rng.randint(FIRST, LAST))
        pairs.append((rng.choice(FORMATS)(day), day.isoformat()))
    return pairs


def splits(train: int = 30000, valid: int = 500, test: int = 1000, seed: int = 0) -> tuple[list[tuple[str, str]], ...]:
    """(train, valid, test) pairs; no date of the validation or test split occurs in another split."""
    pool = generate(train + 3 * (valid + test), seed)
    test_pairs = pool[:test]
    valid_pairs = pool[test : test + valid]
    held = {iso for _, iso in pool[: test + valid]}
    tested = {iso for _, iso in test_pairs}  # once (built per validation pair, the split grew as valid x test)
    valid_pairs = [p for p in valid_pairs if p[1] not in tested]
    train_pairs = [p for p in pool[test + valid :] if p[1] not in held][:train]
    return train_pairs, valid_pairs, test_pairs
