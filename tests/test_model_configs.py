"""Model configs: validation messages carry the values; presets; dict round trips."""

import dataclasses
import re

import pytest
import torch

from maskattn import decoding
from maskattn.models import CaptionerConfig, DecoderLMConfig, EncoderConfig, Transformer, TransformerConfig, persistence


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30), r"d_model \(30\) must be divisible by num_heads \(8\)"),
    (dict(num_kv_heads=3), r"num_heads \(8\) must be divisible by num_kv_heads \(3\)"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(num_encoder_layers=0), "num_encoder_layers must be a positive int, got 0"),
    (dict(pad_id=1), r"pad_id, bos_id and eos_id must differ"),
    (dict(tgt_vocab_size=100), r"share_embeddings needs equal vocabularies"),
    (dict(eos_id=40000), r"eos_id must be None or an id in \[0, 37000\), got 40000"),
])
def test_transformer_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)


def test_presets_and_overrides():
    assert TransformerConfig.preset("base") == TransformerConfig()
    assert DecoderLMConfig.preset("tiny", num_layers=3).num_layers == 3
    assert EncoderConfig.preset("minilm-l6").d_model == 384
    with pytest.raises(ValueError, match=r"unknown TransformerConfig preset 'huge'; expected one of"):
        TransformerConfig.preset("huge")


def test_dict_round_trip_and_unknown_fields():
    config = DecoderLMConfig.preset("small", positions="rope")
    assert DecoderLMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown DecoderLMConfig fields \['layers'\]"):
        DecoderLMConfig.from_dict({"layers": 2})


BOOL_FIELDS = [(cls, f.name, f.type) for cls in (TransformerConfig, DecoderLMConfig, EncoderConfig, CaptionerConfig)
               for f in dataclasses.fields(cls) if f.type in ("bool", "bool | None")]


@pytest.mark.parametrize("cls, name, kind", BOOL_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in BOOL_FIELDS])
def test_a_switch_given_a_string_or_number_is_refused_naming_it(cls, name, kind):
    # A JSON config's "bias": "false" built a model with biases (a non-empty string is truthy), "norm_first": "no" a
    # pre-LN model, "tie_output": 0 an untied one, without a word; the oracle is JSON's own booleans.
    for value in ("false", "no", 0, 1, 1.0, [], *([None] if kind == "bool" else [])):
        message = rf"^{name} must be True(, False)? or (False|None), got {re.escape(repr(value))}$"
        with pytest.raises(ValueError, match=message):
            cls.from_dict({**cls.preset("tiny").to_dict(), name: value})
    for value in (True, False, *([None] if kind == "bool | None" else [])):
        try:
            config = cls.from_dict({**cls.preset("tiny").to_dict(), name: value})
        except ValueError as e:  # another rule may refuse the value (tie_output without shared tables)
            assert not str(e).startswith(f"{name} must be")
        else:
            assert getattr(config, name) is value


@pytest.mark.parametrize("cls, name", [(DecoderLMConfig, "num_kv_heads"), (EncoderConfig, "num_kv_heads"),
                                       (TransformerConfig, "num_kv_heads"), (TransformerConfig, "tgt_vocab_size"),
                                       (DecoderLMConfig, "sliding_window")])
def test_an_optional_size_that_is_not_a_positive_int_is_refused_naming_it(cls, name):
    # num_kv_heads=2.0 or True passed the config (refused only when the model was built); "2" was a TypeError
    # ("'<' not supported between 'str' and 'int'"); tgt_vocab_size=2.5 failed inside torch.empty
    extra = {"share_embeddings": False, "tie_output": False} if name == "tgt_vocab_size" else {}
    for value in (2.0, "2", True, 0, -2):
        with pytest.raises(ValueError, match=rf"^{name} must be None or a positive int, got {re.escape(repr(value))}$"):
            cls.preset("tiny", **extra, **{name: value})
    for value in (None, 4):  # the oracle: the int the field is typed as
        assert getattr(cls.preset("tiny", **extra, **{name: value}), name) == value


@pytest.mark.parametrize("cls", [TransformerConfig, CaptionerConfig])
def test_a_seq2seq_model_needs_its_bos_id(cls):
    # bos_id=None passed the config; decoding then failed inside torch.full ("fill_value must be Number, not
    # NoneType"), and a Captioner's summary() likewise. The decoder's first input is bos_id: it must be an id.
    vocab = cls.preset("tiny").vocab_size
    with pytest.raises(ValueError, match=rf"^bos_id must be an id in \[0, {vocab}\), got None$"):
        cls.preset("tiny", bos_id=None)
    with pytest.raises(ValueError, match=r"^pad_id must be None or an id"):  # pad_id stays optional
        cls.preset("tiny", pad_id=-1)
    assert cls.preset("tiny", pad_id=None).pad_id is None



@pytest.mark.parametrize("cls", [TransformerConfig, CaptionerConfig])
def test_a_seq2seq_model_may_have_no_eos(cls):
    # eos_id=None (no EOS token: decoding runs every row to its limit) was accepted before the ids typed int
    # were made required, and saved models may hold it: it stays valid, typed int | None.
    assert cls.preset("tiny", eos_id=None).eos_id is None
    with pytest.raises(ValueError, match=r"^eos_id must be None or an id in \[0, "):
        cls.preset("tiny", eos_id=-1)


def test_a_transformer_without_eos_decodes_to_its_limit_and_loads(tmp_path):
    # Oracle: the same weights decoded with decoding.NO_EOS, which never stops a row whatever the config's EOS.
    torch.manual_seed(0)
    with_eos = Transformer(TransformerConfig.preset("tiny")).eval()
    without = Transformer(TransformerConfig.preset("tiny", eos_id=None)).eval()
    without.load_state_dict(with_eos.state_dict())
    src = torch.randint(3, 64, (2, 5))
    out = decoding.greedy(without, src, max_new_tokens=6)
    assert out.shape == (2, 6)
    assert torch.equal(out, decoding.greedy(with_eos, src, max_new_tokens=6, eos_id=decoding.NO_EOS))
    persistence.save(without, tmp_path / "m")
    loaded = persistence.load(tmp_path / "m")
    assert loaded.config.eos_id is None
    assert torch.equal(decoding.greedy(loaded, src, max_new_tokens=6), out)


@dataclasses.dataclass
class _ConfigWithASwitch(DecoderLMConfig):  # this module does not write its annotations as strings
    extra_switch: bool = False  # a user's own switch
    extra_id: int = 1  # a user's own token id


def test_the_field_rules_hold_for_a_subclass_whose_annotations_are_not_strings():
    # The rules compared dataclasses' field types with the strings "bool" and "int": a config subclass in a module
    # without `from __future__ import annotations` has type objects there, and its switches were read by truthiness
    base = dataclasses.asdict(DecoderLMConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"^extra_switch must be True or False, got 'no'$"):
        _ConfigWithASwitch(**base, extra_switch="no")
    with pytest.raises(ValueError, match=r"^tie_output must be True or False, got 0$"):  # an inherited one too
        _ConfigWithASwitch(**{**base, "tie_output": 0})
    assert _ConfigWithASwitch(**base, extra_switch=True).extra_switch is True


def test_a_subclass_with_an_annotation_that_does_not_resolve_still_builds_and_is_checked():
    # Reading the field types with typing.get_type_hints raised NameError for a field annotated (as a string) with a
    # class local to a function or a name imported under TYPE_CHECKING: such a config could not be built at all
    class Local:  # not visible from this module's globals
        pass

    @dataclasses.dataclass
    class WithLocal(DecoderLMConfig):
        extra: "Local | None" = None  # a user's own setting, a string as `from __future__ import annotations` writes
        extra_switch: "bool" = False  # a user's own switch
    base = dataclasses.asdict(DecoderLMConfig.preset("tiny"))
    assert WithLocal(**base).extra is None  # the oracle: what the base config builds, with the default
    with pytest.raises(ValueError, match=r"^extra_switch must be True or False, got 'no'$"):
        WithLocal(**base, extra_switch="no")
    with pytest.raises(ValueError, match=r"^tie_output must be True or False, got 0$"):
        WithLocal(**{**base, "tie_output": 0})


def test_a_config_class_made_per_call_is_not_kept_alive_by_the_field_rules():
    # The field types were cached per class by functools.cache, which kept every class it saw: a config subclass
    # made inside a function (a test, a sweep) lived as long as the process. The oracle: a weak reference dies.
    import gc
    import weakref

    base = dataclasses.asdict(DecoderLMConfig.preset("tiny"))
    classes = []
    for _ in range(5):
        @dataclasses.dataclass
        class Made(DecoderLMConfig):
            extra_switch: bool = False  # a user's own switch

        with pytest.raises(ValueError, match=r"^extra_switch must be True or False, got 'no'$"):
            Made(**base, extra_switch="no")  # the rules still read the class's own fields
        assert Made(**base, extra_switch=True).extra_switch is True
        classes.append(weakref.ref(Made))
        del Made
    gc.collect()  # a dataclass holds cycles (its methods' closures)
    assert [made() for made in classes] == [None] * 5
