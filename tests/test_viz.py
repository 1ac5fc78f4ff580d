import json
import shutil
from pathlib import Path

import pytest
import torch

import maskattn
from maskattn import explorer, masks
from maskattn.cli import main
from maskattn.models import Transformer, TransformerConfig
from maskattn.tasks import dates, translation
from maskattn.training import TrainConfig
from maskattn.viz import capture_attention

PNG = b"\x89PNG\r\n\x1a\n"


def test_captured_weights_equal_return_weights_and_outputs_are_untouched():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", positions="rope")).eval()
    src = torch.randint(3, 64, (2, 7))
    tgt = torch.randint(3, 64, (2, 5))
    lengths = torch.tensor([7, 4])
    with torch.no_grad():
        plain = model(src, tgt, src_lengths=lengths)
        with capture_attention(model) as captured:
            hooked = model(src, tgt, src_lengths=lengths)
    assert torch.equal(plain, hooked)
    assert len(captured) == 6  # 2 encoder self, 2 decoder self, 2 cross

    # independent recomputation of the last cross-attention: project, then attention(return_weights=True)
    layer = model.decoder.layers[-1]
    inputs = {}
    handle = layer.cross_attn.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.update(query=args[0], memory=kwargs["key"]),
        with_kwargs=True)
    with torch.no_grad():
        model(src, tgt, src_lengths=lengths)
    handle.remove()
    attn = layer.cross_attn
    q = attn.q_proj(inputs["query"]).view(2, 5, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(inputs["memory"]).view(2, 7, attn.num_kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(inputs["memory"]).view(2, 7, attn.num_kv_heads, -1).transpose(1, 2)
    _, expected = maskattn.attention(q, k, v, masks.padding(lengths), return_weights=True, backend="reference")
    torch.testing.assert_close(captured["decoder.layers.1.cross_attn"][0], expected)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A demo-task model trained for a few steps: enough to have a real checkpoint to draw."""
    out = tmp_path_factory.mktemp("demo")
    train, valid, _ = dates.splits(train=400, valid=20, test=20, seed=0)
    cfg = translation.TranslationConfig(
        data=translation.DataConfig(tokenizer="chars", max_tokens=400, valid_limit=10),
        model=TransformerConfig.preset("tiny", max_len=64),
        train=TrainConfig(steps=5, warmup=2, progress=False, metric="exact_match", higher_is_better=True),
        decode=translation.DecodeConfig(beam_size=1), out=str(out))
    return Path(translation.train(cfg, train, valid)["model"])


@pytest.fixture(scope="module")
def demo_viz(demo_checkpoint, tmp_path_factory):
    """One `maskattn viz` of the demo model (30 pictures take seconds): tests read it, or copy it to change it."""
    out = tmp_path_factory.mktemp("viz") / "viz"
    assert main(["viz", str(demo_checkpoint), "--input", "3 May 1999", "--out", str(out)]) == 0
    return out


def test_viz_command_writes_heatmaps_grids_and_page(demo_viz, tmp_path, capsys):
    out = demo_viz
    pngs = sorted(out.glob("*.png"))
    # tiny preset: 2 encoder self + 2 decoder self + 2 cross layers, 4 heads each, plus a grid per layer
    assert len(pngs) == 6 * 4 + 6
    assert all(p.read_bytes()[:8] == PNG for p in pngs)
    assert (out / "decoder_layers_1_cross_attn_grid.png").exists()
    page = (out / "explorer.html").read_text()
    assert "<script" in page and "http://" not in page and "https://" not in page  # self-contained
    assert main(["masks", "show", "causal & window(3)", "--length", "6", "--png", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG


def test_viz_into_a_used_directory_replaces_the_earlier_pictures_only(demo_checkpoint, demo_viz, tmp_path, capsys):
    # a second viz (a smaller model, say) left the first one's extra layers beside its own pictures
    out = tmp_path / "viz"
    shutil.copytree(demo_viz, out)
    first = json.loads((out / "viz.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir() if p.name != "viz.json") == first and len(first) == 6 * 4 + 6 + 1
    (out / "encoder_layers_5_self_attn_grid.png").write_bytes(PNG)  # as if a 6-layer model's viz wrote it
    (out / "viz.json").write_text(json.dumps({"files": [*first, "encoder_layers_5_self_attn_grid.png"]}))
    (out / "notes.txt").write_text("mine")  # not a viz picture: kept
    assert main(["viz", str(demo_checkpoint), "--input", "4 June 2001", "--out", str(out)]) == 0
    assert not (out / "encoder_layers_5_self_attn_grid.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "viz.json").read_text())["files"] == first


def test_audit_command(demo_checkpoint, capsys):
    assert main(["audit", str(demo_checkpoint), "--length", "6"]) == 0
    assert "no leak found" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_explorer_page_in_a_headless_browser(demo_viz):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    out = demo_viz
    import json
    import re

    page_text = (out / "explorer.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page_text, re.S)
                      .group(1))
    cross = next(a for a in data["attentions"] if a["kind"] == "cross-attention" and a["layer"] == 1)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto((out / "explorer.html").as_uri())
        assert page.inner_text("#title").startswith("encoder self-attention, layer 0")
        page.select_option("#kind", "cross-attention")
        page.select_option("#layer", "1")
        page.select_option("#head", "2")
        assert page.inner_text("#title") == "cross-attention, layer 1 \u2014 head 2"
        weights = explorer.decode_weights(cross)[2]
        drawn = page.locator("line.link").count()
        assert drawn == sum(v > 0 for row in weights for v in row)
        page.hover("text.query[data-q='1']")
        shades = [float(x) for x in page.locator("rect.keybox").evaluate_all("els => els.map(e => e.dataset.w)")]
        assert shades == pytest.approx(weights[1], abs=1e-6)
        shown = page.locator("line.link").evaluate_all("els => els.filter(e => e.style.display !== 'none').length")
        assert shown == sum(v > 0 for v in weights[1])
        page.select_option("#head", "mean")
        assert "mean of 4 heads" in page.inner_text("#title")
        browser.close()


def test_capture_observes_through_hooks_and_leaves_no_trace():
    """Capture registers hooks on each layer's parameter-free ``attend`` submodule and removes them;
    it sets no attribute, and the state_dict keys are the projections' alone."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    attn = model.decoder.layers[0].cross_attn
    assert not [k for k in model.state_dict() if "attend" in k]
    before = dict(vars(attn))
    with torch.no_grad(), capture_attention(model, layers=["decoder.layers.0.cross_attn"]) as captured:
        assert attn.attend._forward_pre_hooks and attn.attend._forward_hooks
        model(torch.randint(3, 64, (1, 6)), torch.randint(3, 64, (1, 4)))
    assert not attn.attend._forward_pre_hooks and not attn.attend._forward_hooks
    assert vars(attn).keys() == before.keys() and not hasattr(attn, "recorder")
    assert captured["decoder.layers.0.cross_attn"][0].shape == (1, 4, 4, 6)


def test_nested_captures_of_one_layer_both_record_it():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src, tgt = torch.randint(3, 64, (2, 6)), torch.randint(3, 64, (2, 4))
    with torch.no_grad():
        plain = model(src, tgt)
        with capture_attention(model) as outer, capture_attention(model, layers=["*.cross_attn"], heads=[1]) as inner:
            hooked = model(src, tgt)
    assert torch.equal(plain, hooked)
    assert len(outer) == 6 and len(inner) == 2
    for name, calls in inner.items():
        torch.testing.assert_close(calls[0], outer[name][0][:, [1]], atol=1e-6, rtol=1e-6)


def test_visualize_takes_kinds_and_layers_from_the_declarations(tmp_path):
    """A model whose module names give nothing away (``body.encoder...``) is drawn as it declares."""
    import json
    import re

    from maskattn.models import EncoderConfig, EncoderModel
    from maskattn.tokenization import Tokenizer
    from maskattn.viz import visualize
    from test_audit import Wrapped

    tok = Tokenizer.train_chars(["3 May 1999"])
    model = Wrapped(EncoderModel(EncoderConfig.preset("tiny", vocab_size=tok.vocab_size, max_len=16)))
    written = visualize(model, tok, "3 May", tmp_path)
    assert (tmp_path / "body_encoder_layers_1_self_attn_grid.png").exists() and len(written) == 2 * (4 + 1) + 1
    page = (tmp_path / "explorer.html").read_text()
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))
    assert [(a["kind"], a["layer"]) for a in data["attentions"]] == [("encoder self-attention", 0),
                                                                     ("encoder self-attention", 1)]
    assert data["attentions"][0]["queries"] == data["attentions"][0]["keys"] == list("3 May")


def test_viz_of_an_empty_input(demo_checkpoint, tmp_path):
    """An empty input has no token to attend: pictures of empty (or BOS-only) rows, not a crash (issue 16), and
    without matplotlib's ~20 "identical low and high xlims" warnings (imshow of a side of no tokens)."""
    import warnings

    out = tmp_path / "viz"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["viz", str(demo_checkpoint), "--input", "", "--out", str(out)]) == 0
    assert [str(w.message) for w in seen if "identical low and high" in str(w.message)] == []
    assert (out / "explorer.html").exists()
    assert (out / "encoder_layers_0_self_attn_head0.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (0, 0)])
def test_pictures_of_no_queries_or_no_keys_set_no_singular_limits(shape, tmp_path):
    import warnings

    from maskattn.viz import head_grid, heatmap

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        written = [heatmap(torch.zeros(shape), tmp_path / "one.png"),
                   head_grid(torch.zeros(2, *shape), tmp_path / "grid.png")]
    assert [str(w.message) for w in seen] == []
    assert all(path.read_bytes()[:8] == PNG for path in written)


def _launch(playwright):
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    return playwright.chromium.launch(executable_path=CHROMIUM, args=args)


def _page_of(length: int, path: Path) -> Path:
    """An explorer page of 3 layers x 4 heads at ``length`` tokens, with tokens that would break a page
    that embeds its JSON unescaped (a BPE vocabulary holds such tokens)."""
    hostile = ["<!--<script>", "</script>", "a&b", "\u2028x\u2029", "verylongtoken" * 4]
    tokens = [hostile[i] if i < len(hostile) else f"tok{i}" for i in range(length)]
    gen = torch.Generator().manual_seed(length)
    records = []
    for layer in range(3):
        scores = torch.randn(4, length, length, generator=gen) * 3
        weights = scores.masked_fill(~masks.causal().to_dense(length, length)[0], float("-inf")).softmax(-1)
        records.append(explorer.attention_record(f"decoder masked self-attention, layer {layer}",
                                                 "decoder masked self-attention", layer, weights, tokens, tokens))
    return explorer.write_page(records, path)


def test_explorer_page_escapes_its_json_and_stays_small(tmp_path):
    """Hostile tokens survive the round trip, and the page grows with the weights' bytes, not their digits
    (issue 16: 8.9 MB at 128 tokens)."""
    import json
    import re

    page = _page_of(256, tmp_path / "explorer.html").read_text()
    block = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block
    data = json.loads(block)
    assert data["attentions"][0]["queries"][:2] == ["<!--<script>", "</script>"]
    assert len(page) < 1.5 * 3 * 4 * 256 * 256 * 4 / 3 + 100_000  # base64 bytes: 1.33 characters a weight
    weights = explorer.decode_weights(data["attentions"][0])
    assert abs(sum(weights[0][5]) - 1) < 6 * 0.5 / explorer.LEVELS  # rounding of 6 allowed weights


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("length", [8, 64, 256])
def test_explorer_layout_at_8_64_and_256_tokens(length, tmp_path):
    """The line view keeps a positive width and its key column inside it, beside or above the heatmap,
    whatever the length (at 128 tokens it had zero width); hostile tokens break nothing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    path = _page_of(length, tmp_path / "explorer.html")
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        assert errors == []
        assert page.inner_text("#title").startswith("decoder masked self-attention, layer 0")
        svg = page.locator("#lines").bounding_box()
        assert svg["width"] > 200
        keys = page.locator("text.key").evaluate_all("els => els.map(e => e.getBBox().x + e.getBBox().width)")
        assert len(keys) == length and max(keys) <= svg["width"]  # the key column is inside the view
        assert page.locator("text.key").first.text_content() == "<!--<script>"
        heat = page.locator("#heat").bounding_box()
        assert heat["width"] > 0 and heat["width"] <= 1280
        page.hover(f"text.query[data-q='{length - 1}']")
        shown = page.locator("line.link").count()
        assert 0 < shown <= length
        page.screenshot(path=str(tmp_path / f"explorer_{length}.png"), full_page=length <= 64)
        shots = Path("/tmp/explorer_shots")  # kept for a human to look at, where that directory exists
        if shots.is_dir():
            shutil.copy(tmp_path / f"explorer_{length}.png", shots / f"explorer_{length}.png")
        browser.close()


def test_a_target_for_a_model_without_cross_attention_is_refused(tmp_path):
    # --target was ignored without a word for decoder-only and encoder models
    from maskattn.models import EncoderConfig, EncoderModel
    from maskattn.tokenization import Tokenizer
    from maskattn.viz import visualize

    tok = Tokenizer.train_chars(["3 May 1999"])
    model = EncoderModel(EncoderConfig.preset("tiny", vocab_size=tok.vocab_size, max_len=16))
    with pytest.raises(ValueError, match="EncoderModel has no cross-attention"):
        visualize(model, tok, "3 May", tmp_path, target="1999")


def test_viz_of_an_input_longer_than_the_model_reads_says_so(demo_checkpoint, tmp_path, capsys):
    assert main(["viz", str(demo_checkpoint), "--input", "3rd of May 1999 " * 20, "--out", str(tmp_path / "v")]) == 2
    assert "more than the model reads (max_len 64); shorten the input" in capsys.readouterr().err


def test_nested_rerun_captures_record_each_call_once():
    # each capture's re-run of a layer was recorded by the other capture too: two entries per call
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src, tgt = torch.randint(3, 64, (2, 6)), torch.randint(3, 64, (2, 4))
    layers = ["decoder.layers.0.*"]
    with torch.no_grad(), capture_attention(model, layers=layers, method="rerun") as a, \
            capture_attention(model, layers=layers, method="rerun") as b:
        model(src, tgt)
    assert set(a) == set(b) and all(len(a[n]) == len(b[n]) == 1 for n in a)
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0])


@pytest.mark.parametrize("method", ["lse", "rerun"])
def test_capture_takes_integer_rows_once_and_refuses_bools(method):
    # method="rerun" indexed with list(rows): [True, False, True] acted as a mask (rows 0 and 2), and a generator was
    # used up by the first call (the second recorded no rows)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src, tgt = torch.randint(3, 64, (2, 7)), torch.randint(3, 64, (2, 5))
    with torch.no_grad(), capture_attention(model, layers=["decoder.layers.0.self_attn"], method=method) as every:
        model(src, tgt)
        model(src, tgt)
    with torch.no_grad(), capture_attention(model, layers=["decoder.layers.0.self_attn"], method=method,
                                            rows=(i for i in (0, 3))) as some:
        model(src, tgt)
        model(src, tgt)
    for whole, part in zip(every["decoder.layers.0.self_attn"], some["decoder.layers.0.self_attn"], strict=True):
        torch.testing.assert_close(part, whole[:, :, [0, 3]])  # both calls: the generator was read once
    for bad in ([True, False, True], torch.tensor([True, False]), [0.0, 2.0], "01"):
        with pytest.raises(ValueError, match="rows must be integer indices"), capture_attention(model, rows=bad,
                                                                                                method=method):
            pass


@pytest.mark.parametrize("method", ["lse", "rerun"])
def test_both_methods_refuse_heads_and_rows_past_the_call_naming_them(method):
    # method="rerun" ended in torch's IndexError for head 99 or row 10, and read -1 as the last row / head where
    # method="lse" refused it: the two methods now take the same indices and name the argument alike
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).eval()  # 4 heads
    src, tgt = torch.randint(3, 64, (2, 7)), torch.randint(3, 64, (2, 5))
    for kwargs, said in [({"heads": [99]}, r"heads must be indices in \[0, 4\), got \[99\]"),
                         ({"heads": [-1]}, r"heads must be indices in \[0, 4\), got \[-1\]"),
                         ({"rows": [0, 5]}, r"rows must be indices in \[0, 5\), got \[0, 5\]"),
                         ({"rows": [-1]}, r"rows must be indices in \[0, 5\), got \[-1\]")]:
        with pytest.raises(ValueError, match=said), torch.no_grad(), capture_attention(
                model, layers=["decoder.layers.0.self_attn"], method=method, **kwargs):
            model(src, tgt)
    with torch.no_grad(), capture_attention(model, heads=[3, 1], rows=[4, 0], method=method) as got:
        model(src, tgt)
    with torch.no_grad():
        _, dense = model(src, tgt, return_weights=True)
    want = dense["decoder"][1]["cross"][:, [3, 1]][:, :, [4, 0]]  # (B, 2, 2, Ls)
    torch.testing.assert_close(got["decoder.layers.1.cross_attn"][0], want)


def test_labels_that_do_not_fit_the_weights_are_named_before_drawing(tmp_path):
    # x_labels of 3 keys for 4 was matplotlib's "number of FixedLocator locations (4) ... labels (3)", after a
    # figure was opened and left open
    import matplotlib.pyplot as plt

    from maskattn.viz import head_grid, heatmap

    open_before = plt.get_fignums()
    for draw, weights in ((heatmap, torch.rand(3, 4)), (head_grid, torch.rand(2, 3, 4))):
        with pytest.raises(ValueError, match=r"x_labels: 3 labels for 4 keys"):
            draw(weights, tmp_path / "w.png", x_labels=list("abc"))
        with pytest.raises(ValueError, match=r"y_labels: 4 labels for 3 queries"):
            draw(weights, tmp_path / "w.png", x_labels=list("abcd"), y_labels=list("abcd"))
        assert draw(weights, tmp_path / "w.png", x_labels=list("abcd"), y_labels=list("abc")).is_file()
    assert plt.get_fignums() == open_before and sorted(p.name for p in tmp_path.iterdir()) == ["w.png"]


def test_the_lse_capture_of_a_call_with_a_query_offset_equals_its_weights():
    # a decoding step's queries sit at q_offset: the causal mask there lets them see keys past their own index
    torch.manual_seed(0)
    layer = maskattn.MultiHeadAttention(8, 2).eval()
    query, memory = torch.randn(1, 2, 8), torch.randn(1, 5, 8)
    with torch.no_grad():
        _, want = layer(query, memory, memory, mask=masks.causal(), q_offset=3, return_weights=True)  # (B, H, 2, 5)
    for method in ("lse", "rerun"):
        with capture_attention(layer, method=method) as seen, torch.no_grad():
            layer(query, memory, memory, mask=masks.causal(), q_offset=3)
        assert torch.allclose(seen[""][0], want, atol=1e-6), method
    assert (want[..., :4] > 0).all() and (want[..., 0, 4] == 0).all()  # query 3 sees keys 0-3, query 4 all five


def _colours_read_back(png, fig, panels):
    """The colour index (0-255) each panel's cells show in the written PNG, every cell's centre pixel matched to the
    nearest viridis colour, and the limits of the figure's one colour bar (as a reader reads them)."""
    import matplotlib
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(float)  # (rows, cols, 3), row 0 at the top
    bars = [ax for ax in fig.axes if ax not in panels]
    assert len(bars) == 1, f"{len(bars)} colour bars for {len(panels)} panels"
    low, high = sorted(bars[0].get_ylim())
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255  # (256, 3)
    shown = []
    for ax in panels:
        (y0, y1), (x0, x1) = ax.get_ylim(), ax.get_xlim()
        lq, lk = round(abs(y1 - y0)), round(abs(x1 - x0))
        cells = []
        for i in range(lq):
            for j in range(lk):
                x, y = ax.transData.transform((j, i))
                colour = pixels[pixels.shape[0] - 1 - int(y), int(x)]
                cells.append(np.argmin(((lut - colour) ** 2).sum(1)))  # matplotlib's colour for [i/256, (i+1)/256)
        shown.append(torch.tensor(cells).view(lq, lk))
    return torch.stack(shown), low, high


@pytest.mark.parametrize("draw", ["heatmap", "head_grid"])
def test_weight_pictures_show_the_weights_on_the_colour_scale_they_draw(draw, tmp_path, monkeypatch):
    # head_grid drew each head on its own colour scale (0 to that head's largest weight) and drew no scale: a head
    # whose weights peak at 0.3 looked as sure as one that peaks at 1.0. The oracle: the weights themselves, read
    # back from the written PNG through the colour bar's limits
    from maskattn import viz

    figures = []
    monkeypatch.setattr(viz, "save_figure", lambda fig, path, **kw: (figures.append(fig), save(fig, path, **kw))[1])
    save = maskattn.plotting.save_figure
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(3, 5, 6) * 2, -1)
    weights[1] *= 0.3  # a head that never attends strongly
    weights[2, :, 4:] = 0.0  # masked keys
    if draw == "heatmap":
        png, truth = viz.heatmap(weights[2], tmp_path / "w.png"), weights[2:]
    else:
        png, truth = viz.head_grid(weights, tmp_path / "w.png"), weights
    panels = figures[0].axes[:len(truth)]  # the heads' axes, made before the colour bar's
    index, low, high = _colours_read_back(png, figures[0], panels)
    shown = low + (high - low) * (index + 0.5) / 256  # the middle of the weights a colour stands for
    assert low == 0 and (shown - truth).abs().max() <= 2 * (high - low) / 256  # a colour off by one: 8-bit RGB
    assert index[-1][truth[-1] == 0].eq(0).all()  # masked keys in the scale's bottom colour


def test_a_non_finite_weight_leaves_the_other_cells_on_the_colour_scale(tmp_path, monkeypatch):
    # head_grid's one colour scale went to NaN with one NaN weight (a diverged model, a row that softmax made 0/0):
    # every cell of every head was drawn as 'bad', blank; matplotlib's own scale skips it, as before. The oracle:
    # the finite weights, read back from the written PNG through the colour bar
    from maskattn import viz

    figures = []
    monkeypatch.setattr(viz, "save_figure", lambda fig, path, **kw: (figures.append(fig), save(fig, path, **kw))[1])
    save = maskattn.plotting.save_figure
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(2, 4, 5), -1)
    for bad in (float("nan"), float("inf")):
        figures.clear()
        drawn = weights.clone()
        drawn[0, 1, 2] = bad
        png = viz.head_grid(drawn, tmp_path / "w.png")
        index, low, high = _colours_read_back(png, figures[0], figures[0].axes[:2])
        shown = low + (high - low) * (index + 0.5) / 256
        finite = drawn.isfinite()
        assert (low, high) == (0, pytest.approx(float(drawn[finite].max()), rel=1e-6)), bad
        assert (shown - weights)[finite].abs().max() <= 2 * (high - low) / 256, bad


def test_explorer_tells_masked_keys_from_allowed_weights_too_small_for_its_rounding(tmp_path):
    # the page stored weights as round(w * 255) bytes and said nothing of it: an allowed weight below 0.002 showed
    # as 0.000, as a masked key's does. Oracle: the weights and the causal mask the page was written from, its
    # embedded data read back with base64 and bit arithmetic of our own
    import base64
    import re

    length, allowed, weights = _tiny_and_masked_weights()
    page = _tiny_and_masked_page(weights, tmp_path).read_text()
    assert "rounded to steps of 1/255" in page and "below 0.002 shows as &lt;0.002" in page  # said on the page
    record = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1))["attentions"][0]
    levels = torch.tensor(list(base64.b64decode(record["weights"])), dtype=torch.float64).view(2, length, length)
    bits = base64.b64decode(record["masked"])
    masked = torch.tensor([(bits[n // 8] >> (7 - n % 8)) & 1 for n in range(2 * length * length)]).view(2, length,
                                                                                                          length)
    assert torch.equal(masked.bool(), ~allowed.expand(2, -1, -1))  # every masked key, and no allowed one
    assert (levels[masked.bool()] == 0).all()
    assert (levels / 255 - weights.double()).abs().max() <= 0.5 / 255 + 1e-9  # rounded to the nearest step
    tiny = ~masked.bool() & (levels == 0)
    assert tiny.any() and (weights[tiny] > 0).all()  # shown as "<0.002", not as masked


def _tiny_and_masked_weights():
    """(2, 6, 6) causal attention weights, some allowed ones below the page's rounding (0.5 / 255)."""
    length = 6
    allowed = masks.causal().to_dense(length, length)[0, 0]  # (Lq, Lk) True = may attend
    scores = torch.randn(2, length, length, generator=torch.Generator().manual_seed(0))
    scores[:, 5, :5] = torch.tensor([0.0, -7.0, -8.0, -12.0, 5.0])  # tiny allowed weights in the last row
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (H, Lq, Lk)
    assert ((weights > 0) & (weights < 0.5 / 255)).any()
    return length, allowed, weights


def _tiny_and_masked_page(weights, directory):
    return explorer.write_page([explorer.attention_record("a", "self", 0, weights, list("abcdef"), list("abcdef"))],
                               directory / "explorer.html")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_explorer_page_shows_masked_keys_and_tiny_weights_apart_in_a_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    length, allowed, weights = _tiny_and_masked_weights()
    path = _tiny_and_masked_page(weights, tmp_path)
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.select_option("#head", "1")
        titles = page.locator("#heat td").evaluate_all("els => els.map(e => e.title)")
        page.hover("text.query[data-q='2']")
        keys = page.locator("rect.keybox").evaluate_all("els => els.map(e => e.dataset.masked)")
        browser.close()
    assert errors == []
    for n, title in enumerate(titles):  # the oracle: the weight and the mask the page was written from
        i, j = divmod(n, length)
        w = float(weights[1, i, j])
        expected = "masked" if not allowed[i, j] else "<0.002" if w < 0.5 / 255 else f"{round(w * 255) / 255:.3f}"
        assert title == expected, (i, j, w, title)
    assert "<0.002" in titles and "masked" in titles
    assert keys == ["0" if allowed[2, j] else "1" for j in range(length)]
