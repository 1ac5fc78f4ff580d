"""maskattn.export: ONNX (run in onnxruntime) and pt2 graphs equal eager at two (batch, length) shapes."""

import pytest
import torch

from maskattn import compression, export
from maskattn.models import DecoderLM, EncoderModel, Transformer
from maskattn.models.config import DecoderLMConfig, EncoderConfig, TransformerConfig

SMALL = {"vocab_size": 40, "d_model": 32, "num_heads": 4, "d_ff": 64, "dropout": 0.0, "attention_dropout": 0.0,
         "max_len": 64}
SHAPES = [(2, 7), (3, 12)]  # (batch, length), neither the traced example's (2, 5)
MODELS = {
    "lm": lambda: DecoderLM(DecoderLMConfig(num_layers=2, positions="rope", **SMALL)),
    "lm_pad": lambda: DecoderLM(DecoderLMConfig(num_layers=2, pad_id=0, **SMALL)),  # padding from pad_id
    "encoder": lambda: EncoderModel(EncoderConfig(num_layers=2, **SMALL)),
    # a classifier's and a QA model's heads are exported too (the graph returned the hidden states only)
    "encoder_heads": lambda: EncoderModel(EncoderConfig(num_layers=2, num_labels=3, span_head=True, pooling="mean",
                                                        **SMALL)),
    "transformer": lambda: Transformer(TransformerConfig(num_encoder_layers=1, num_decoder_layers=2, **SMALL)),
    # decoder layers pruned to different key/value head counts (compress --prune-heads): the decoder step stacked
    # their caches and failed with "Sizes of tensors must match"
    "transformer_pruned": lambda: _pruned(Transformer(TransformerConfig(num_encoder_layers=1, num_decoder_layers=2,
                                                                        **SMALL))),
}


def _pruned(model):
    compression.prune(model, {"decoder.layers.0.self_attn": [1, 3], "decoder.layers.1.self_attn": [0, 1, 2]})
    return model


def _runner(path, fmt):
    """A function of torch tensors that runs the exported file, returning a tuple of tensors."""
    if fmt == "pt2":
        module = torch.export.load(path).module()
        return lambda *xs: tuple(torch.atleast_1d(y) for y in torch.utils._pytree.tree_leaves(module(*xs)))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *xs: tuple(torch.from_numpy(y) for y in session.run(None, {
        n: x.numpy() for n, x in zip(names, xs, strict=True)}))


def _ids(batch, length, lengths):
    ids = torch.randint(1, SMALL["vocab_size"], (batch, length))
    return ids.masked_fill(torch.arange(length) >= torch.tensor(lengths)[:, None], 0)  # right padding, pad_id 0


@pytest.fixture(scope="module", params=[(m, f) for m in MODELS for f in export.FORMATS], ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    name, fmt = request.param
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    files = export.export(model, tmp_path_factory.mktemp(name) / f"model.{fmt}", format=fmt)
    return name, model, [_runner(path, fmt) for path in files]


@pytest.mark.parametrize(("batch", "length"), SHAPES)
def test_exported_graphs_equal_eager(exported, batch, length):
    name, model, runners = exported
    lengths = [length] + [max(1, length - 3 * i) for i in range(1, batch)]
    ids = _ids(batch, length, lengths)
    with torch.no_grad():
        if name in ("lm", "lm_pad"):
            (logits,) = runners[0](ids)
            torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
        elif name.startswith("encoder"):
            types = (torch.arange(length) >= length // 2).long().expand(batch, length)  # two segments, as in QA
            got = runners[0](ids, ids != 0, types)
            want = [model(ids, ids != 0, token_type_ids=types)]
            if name == "encoder_heads":
                want += [model.classify(ids, ids != 0, token_type_ids=types),
                         *model.span_logits(ids, ids != 0, token_type_ids=types)]
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        else:
            _check_transformer(model, *runners, ids, torch.tensor(lengths))


def test_a_blocked_backend_model_exports_to_pt2_for_lengths_across_a_tile(tmp_path):
    """backend="blocked" exports its custom operator (pt2). Traced at length 5 (one 128-row tile), the graph
    was guarded to lengths <= 128 and the export refused its own dynamic length; here it runs at 7 and 200."""
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig(num_layers=1, backend="blocked", **{**SMALL, "max_len": 256})).eval()
    (path,) = export.export(model, tmp_path / "model.pt2", format="pt2")
    run = _runner(path, "pt2")
    for batch, length in ((2, 7), (3, 200)):
        ids = _ids(batch, length, [length] * batch)
        with torch.no_grad():
            torch.testing.assert_close(run(ids)[0], model(ids), atol=1e-5, rtol=1e-5)


def _check_transformer(model, encoder, step, src, lengths):
    """Encoder, then four cached steps from an empty cache, against Transformer.encode / start / step."""
    (memory,) = encoder(src, src != 0)
    torch.testing.assert_close(memory, model.encode(src, lengths)[0], atol=1e-5, rtol=1e-5)
    left = torch.stack([row.roll(int(n)) for row, n in zip(src, src.shape[1] - lengths, strict=True)])  # left padding
    (left_memory,) = encoder(left, left != 0)  # read as the mask it is (it was taken for right padding)
    torch.testing.assert_close(left_memory, model.encode(left)[0], atol=1e-5, rtol=1e-5)  # valid from pad_id 0
    attn = model.decoder.layers[0].self_attn
    kv_heads = max(layer.self_attn.num_kv_heads for layer in model.decoder.layers)
    keys = torch.zeros(len(model.decoder.layers), src.shape[0], kv_heads, 0, attn.head_dim)
    values = keys.clone()
    state = model.start(src, lengths, max_len=4)
    tokens = torch.full((src.shape[0], 1), model.config.bos_id)
    for _ in range(4):
        logits, keys, values = step(tokens, memory, src != 0, keys, values)
        torch.testing.assert_close(logits, model.step(state, tokens)[:, -1], atol=1e-5, rtol=1e-5)
        tokens = logits.argmax(-1, keepdim=True)


def test_unknown_format_and_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export.export(MODELS["lm"](), tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="cannot export a Linear"):
        export.export(torch.nn.Linear(2, 2), tmp_path / "x.pt2", format="pt2")


def test_cli_exports_a_saved_model(tmp_path, capsys):
    from maskattn.cli import main

    torch.manual_seed(0)
    model = MODELS["transformer"]().eval()
    model.save(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--format", "pt2", "--out", str(tmp_path / "mt.pt2")]) == 0
    assert "mt.decoder_step.pt2" in capsys.readouterr().out
    src = _ids(2, 6, [6, 4])
    (memory,) = _runner(tmp_path / "mt.encoder.pt2", "pt2")(src, src != 0)
    torch.testing.assert_close(memory, model.encode(src)[0], atol=1e-5, rtol=1e-5)


def test_an_int8_model_exports_to_pt2_and_is_refused_for_onnx_in_one_line(tmp_path, capsys):
    # the ONNX exporter failed on aten._int_mm with a 63-line traceback
    from maskattn.cli import main
    from maskattn.models import compressed

    torch.manual_seed(0)
    model = MODELS["lm"]().eval()
    compressed.quantize_linears(model)
    model.save(tmp_path / "int8")
    assert main(["export", str(tmp_path / "int8"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "exports to pt2 only" in capsys.readouterr().err
    (path,) = export.export(model, tmp_path / "m.pt2", format="pt2")
    ids = _ids(2, 7, [7, 4])
    with torch.no_grad():
        torch.testing.assert_close(_runner(path, "pt2")(ids)[0], model(ids), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("backend", ["blocked", "flex"])
def test_a_model_whose_backend_onnx_cannot_convert_is_refused_in_one_line(tmp_path, capsys, backend):
    # the ONNX exporter failed on the custom operator maskattn::blocked_attention (and on flex's sort) with a
    # 62-line ConversionError
    from maskattn.cli import main

    model = DecoderLM(DecoderLMConfig(num_layers=1, backend=backend, **SMALL))
    model.save(tmp_path / backend)
    assert main(["export", str(tmp_path / backend), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "exports to pt2 only" in err and f"backend={backend!r}" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))


def test_a_failed_export_replaces_none_of_the_graphs(tmp_path, monkeypatch):
    # the two graphs of a Transformer were written one after the other: a failure in the second left a new
    # encoder beside an old decoder step
    model = MODELS["transformer"]().eval()
    for name in ("m.encoder.pt2", "m.decoder_step.pt2"):
        (tmp_path / name).write_text("old")
    save = torch.export.save
    calls = []

    def second_fails(program, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save(program, path, *args, **kwargs)

    monkeypatch.setattr(torch.export, "save", second_fails)
    with pytest.raises(OSError, match="No space left"):
        export.export(model, tmp_path / "m.pt2", format="pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.decoder_step.pt2", "m.encoder.pt2"]
    assert all((tmp_path / n).read_text() == "old" for n in ("m.encoder.pt2", "m.decoder_step.pt2"))


def test_export_writes_over_no_input_and_no_file_unless_told(tmp_path, capsys):
    # `--out MODEL/model.safetensors` replaced the weights it was exporting (the model no longer loaded), any
    # existing file was replaced without a word, and a .pt2 name silently held an ONNX graph
    from maskattn.cli import main

    model = MODELS["lm"]().eval()
    model.save(tmp_path / "model")
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    (tmp_path / "text.pt2").write_text("my notes")
    (tmp_path / "dir.pt2").mkdir()
    cases = ((["--out", str(tmp_path / "model" / "model.safetensors")], "that would write over the input"),
             (["--out", str(tmp_path / "text.pt2"), "--format", "pt2"], "text.pt2 exists; give --overwrite"),
             (["--out", str(tmp_path / "dir.pt2"), "--format", "pt2"], "a directory, expected a file to write"),
             (["--out", str(tmp_path / "lm.pt2")], "a .pt2 name for a onnx file; name it lm.onnx or give --format "
                                                   "pt2"),
             (["--out", ""], "--out: an empty path"))
    for args, expected in cases:
        assert main(["export", str(tmp_path / "model"), *args]) == 2
        assert expected in capsys.readouterr().err
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "text.pt2").read_text() == "my notes"
    assert main(["export", str(tmp_path / "model"), "--format", "pt2", "--out", str(tmp_path / "text.pt2"),
                 "--overwrite"]) == 0
    assert (tmp_path / "text.pt2").read_bytes()[:2] == b"PK"  # a pt2 archive now


def test_an_onnx_export_prints_nothing_about_what_the_model_does_not_use(tmp_path):
    # torch's exporter warned on its first use in a process, once per torchvision operator it skips, and raised
    # pytree's LeafSpec deprecation from inside itself; a fresh process, so that the first use is this one
    pytest.importorskip("onnxscript")
    import subprocess
    import sys

    code = ("from maskattn.export import export\nfrom maskattn.models import DecoderLM, DecoderLMConfig\n"
            "lm = DecoderLM(DecoderLMConfig(vocab_size=40, d_model=32, num_heads=4, d_ff=64, num_layers=1)).eval()\n"
            f"print(export(lm, {str(tmp_path / 'lm.onnx')!r}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "lm.onnx" in run.stdout and (tmp_path / "lm.onnx").is_file()
    assert "torchvision" not in run.stderr and "LeafSpec" not in run.stderr, run.stderr


def test_the_onnx_quieting_drops_the_torchvision_lines_only():
    import logging

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with export._quiet_onnx_exporter():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("Failed to infer the signature for function %s", "f")
        logger.warning("torchvision is not installed. Skipping %s", "after")  # the filter is gone again
    finally:
        logger.removeHandler(handler)
    assert seen == ["Failed to infer the signature for function f", "torchvision is not installed. Skipping after"]


def test_a_pt2_program_takes_lengths_up_to_max_len_and_names_a_longer_input(tmp_path):
    # the length was declared up to 65,536 whatever max_len: past it the program failed in the position table
    # with "IndexError: index out of range in self"; eager refuses such an input, so does the program now
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig(num_layers=1, **{**SMALL, "max_len": 16})).eval()
    (path,) = export.export(model, tmp_path / "model.pt2", format="pt2")
    run = _runner(path, "pt2")
    ids = _ids(2, 16, [16, 9])
    with torch.no_grad():
        torch.testing.assert_close(run(ids)[0], model(ids), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="max_len=16"):
            model(_ids(1, 17, [17]))
        with pytest.raises(AssertionError, match=r"input_ids.size\(\)\[1\] <= 16"):
            run(_ids(1, 17, [17]))


@pytest.mark.slow
def test_a_pt2_export_onto_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    # torch's zip writer, given the file itself, aborted the whole process (SIGABRT, "terminate called after throwing
    # an instance of 'c10::Error'") when the disk filled; a file size limit (RLIMIT_FSIZE) fills it here
    import subprocess
    import sys

    DecoderLM(DecoderLMConfig(vocab_size=40, d_model=32, num_heads=4, d_ff=64, num_layers=1)).save(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
            "from maskattn.cli import main\n"
            f"sys.exit(main(['export', {str(tmp_path / 'model')!r}, '--format', 'pt2', '--out', "
            f"{str(out / 'lm.pt2')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip() == f"maskattn export: could not write {out / 'lm.pt2'}: File too large"
    assert list(out.iterdir()) == []
