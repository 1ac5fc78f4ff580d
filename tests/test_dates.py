import datetime as dt

from maskattn.tasks import dates


def test_deterministic_and_correct():
    a = dates.generate(500, seed=7)
    assert a == dates.generate(500, seed=7) and a != dates.generate(500, seed=8)
    for text, iso in a:
        day = dt.date.fromisoformat(iso)
        assert str(day.year) in text
        assert str(day.day) in text  # every format spells the day with digits


def test_every_format_is_used_and_hand_examples():
    d = dt.date(1998, 3, 3)
    rendered = [f(d) for f in dates.FORMATS]
    assert "Tuesday, 3rd of March 1998" in rendered and "03/03/1998" in rendered and "3-MAR-1998" in rendered
    assert dates._ordinal(11) == "11th" and dates._ordinal(22) == "22nd" and dates._ordinal(101) == "101st"


def test_held_out_dates_never_seen_in_training():
    train, valid, test = dates.splits(train=3000, valid=100, test=200, seed=1)
    assert len(train) == 3000 and len(test) == 200 and 90 < len(valid) <= 100
    iso = [{d for _, d in split} for split in (train, valid, test)]
    assert not iso[0] & iso[1] and not iso[0] & iso[2] and not iso[1] & iso[2]


def test_splits_hash_each_date_a_bounded_number_of_times(monkeypatch, counted_str):
    # The test split's set of dates was built again for every validation pair: work grew as valid x test
    # (valid=test=4,000 took 1.7 s, 4 times 2,000's). Counted as hashes of the generated dates.
    generate = dates.generate
    monkeypatch.setattr(dates, "generate", lambda n, seed: [(t, counted_str(i)) for t, i in generate(n, seed)])
    train, valid, test = dates.splits(train=200, valid=300, test=300, seed=3)
    assert counted_str.hashes <= 10 * (200 + 3 * (300 + 300))  # a few per pair, not one per (valid, test) pair
    held = {iso for _, iso in test}  # the splits are those of the definition
    assert valid and not any(iso in held for _, iso in valid)
    assert not any(iso in held or iso in {v for _, v in valid} for _, iso in train)
