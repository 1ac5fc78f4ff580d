"""The caption task: digit canvases split by scan, the Captioner, its decoding, the alignment score, the CLI."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import itertools

from maskattn import decoding, load
from maskattn.cli import main
from maskattn.layers.patches import PatchEmbedding, patch_valid
from maskattn.models import Captioner, CaptionerConfig
from maskattn.tasks import caption as C


def tiny_model(**overrides):
    torch.manual_seed(0)
    return Captioner(CaptionerConfig.preset("tiny", **overrides)).eval()


def test_splits_share_no_scan_and_cover_every_digit():
    images, labels = C.load_scans()
    assert images.shape == (1797, 8, 8) and images.min() >= 0 and images.max() <= 1
    splits = C.split_scans(labels, C.DataConfig())
    seen = [set(s.tolist()) for s in splits.values()]
    assert sum(len(s) for s in seen) == 1797 and len(set.union(*seen)) == 1797  # disjoint, complete
    for name in ("valid", "test"):
        assert set(labels[splits[name]].tolist()) == set(range(10))  # stratified: every digit in every split
    assert all((a == b).all() for a, b in zip(splits.values(), C.split_scans(labels, C.DataConfig()).values(),
                                               strict=True))  # deterministic
    with pytest.raises(ValueError, match=r"data.valid_fraction \(0.6\)"):
        C.split_scans(labels, C.DataConfig(valid_fraction=0.6, test_fraction=0.5))


def test_canvases_use_only_their_split_and_are_deterministic():
    d = C.DataConfig()
    images, labels = C.load_scans()
    pools = C.split_scans(labels, d)
    for split in ("valid", "test"):
        for c in C.canvases(split, 50, d, 4):
            assert set(c.scans) <= set(pools[split].tolist())
            assert 2 <= len(c.digits) <= 4 and c.image.shape[0] % 4 == 0 and c.image.shape[1] % 4 == 0
            lefts = [left for _, left in c.boxes]
            assert lefts == sorted(lefts) and all(b - a >= 8 for a, b in itertools.pairwise(lefts))
            for scan, (top, left) in zip(c.scans, c.boxes, strict=True):  # each scan really is where it says
                assert np.array_equal(c.image[top : top + 8, left : left + 8], images[scan])
            assert c.caption == " ".join(C.NAMES[labels[s]] for s in c.scans)
    a = C.canvas("train", 7, pools, d, 4, seed=0)
    assert np.array_equal(a.image, C.canvas("train", 7, pools, d, 4, seed=0).image)
    assert set(a.scans) <= set(pools["train"].tolist())


def test_patch_embedding_and_padding_of_smaller_canvases():
    embed = PatchEmbedding(2, 8, max_rows=3, max_cols=4)
    images = torch.arange(2 * 4 * 6, dtype=torch.float).reshape(2, 4, 6)
    tokens = embed(images)  # (2, 6, 8): a 2 x 3 grid
    patch = images[1, 2:4, 4:6].reshape(-1)  # row 1, column 2 = token 5
    expected = embed.proj(patch) + embed.rows.weight[1] + embed.cols.weight[2]
    torch.testing.assert_close(tokens[1, 5], expected)
    valid = patch_valid([[4, 6], [2, 4]], (2, 3), 2, batch=2)
    assert valid.tolist() == [[True] * 6, [True, True, False, False, False, False]]
    with pytest.raises(ValueError, match="multiples of patch_size"):
        embed(torch.zeros(1, 3, 6))
    # 8x10 is a multiple of 2 but past the 6x8 of 3 x 4 patch positions: it said "must be multiples" (session 22)
    with pytest.raises(ValueError, match=r"images of 8x10 pixels: larger than the model's 6x8"):
        embed(torch.zeros(1, 8, 10))
    with pytest.raises(ValueError, match=r"sizes must be multiples of patch_size \(2\)"):
        patch_valid([[3, 6]], (2, 3), 2, batch=1)


def test_patch_sizes_are_read_back_once_and_never_when_given_as_lists(host_reads):
    # patch_valid read a sizes tensor back once per condition (not multiples, too small, too large: three waits for a
    # GPU on every captioner forward and at the start of every caption), and lists (already on the host) as well.
    # Oracle: each patch row < height / P and column < width / P, written out; the same message for bad sizes.
    good, bad = [[4, 6], [2, 4]], [[4, 6], [3, 8]]
    expected = [[r < h // 2 and k < w // 2 for r in range(2) for k in range(3)] for h, w in good]
    for sizes, reads_expected in ((good, 0), (tuple(map(tuple, good)), 0), (torch.tensor(good), 1)):
        with host_reads() as reads:
            valid = patch_valid(sizes, (2, 3), 2, batch=2)
        assert reads.count == reads_expected, (sizes, reads.count)
        assert valid.tolist() == expected
    message = r"^sizes must be multiples of patch_size \(2\) within the batch's 4x6 canvas, got \[\[4, 6\], \[3, 8\]\]$"
    for sizes, reads_expected in ((bad, 0), (torch.tensor(bad), 1)):
        with host_reads() as reads, pytest.raises(ValueError, match=message):
            patch_valid(sizes, (2, 3), 2, batch=2)
        assert reads.count == reads_expected, (sizes, reads.count)


@pytest.mark.parametrize("given", ["none", "lists", "tensor"])
def test_the_start_of_a_caption_reads_only_the_sizes_tensor_it_was_given(host_reads, given):
    # begin_decoding read a sizes tensor back three times (patch_valid) and lists too, then the BOS ids it fills
    # itself: four waits for a GPU per caption. Oracle: one read for a tensor, none otherwise; the tokens are those
    # of each image captioned alone, cropped to its canvas.
    model = tiny_model()
    host_reads.uncounted(model.encoder)  # the attention layers' own reads are not counted here
    host_reads.uncounted(model.decoder)
    images, real = torch.rand(2, 8, 16), [[8, 16], [4, 8]]
    sizes = {"none": None, "lists": real, "tensor": torch.tensor(real)}[given]
    with torch.no_grad(), host_reads() as reads:
        model.begin_decoding(images, sizes, max_new_tokens=4)
    assert reads.count == (given == "tensor"), reads.count
    if sizes is not None:
        alone = [decoding.greedy(model, images[b : b + 1, :h, :w], max_new_tokens=6, eos_id=decoding.NO_EOS)
                 for b, (h, w) in enumerate(real)]
        assert torch.equal(decoding.greedy(model, images, sizes, max_new_tokens=6, eos_id=decoding.NO_EOS),
                           torch.cat(alone))


def test_padding_patches_change_nothing():
    model = tiny_model()
    image = torch.rand(1, 8, 16)
    padded = torch.cat([image, torch.rand(1, 8, 16)], dim=2)  # noise where the canvas has ended
    tgt = torch.tensor([[2, 5, 9]])
    torch.testing.assert_close(model(image, tgt), model(padded, tgt, sizes=[[8, 16]]), atol=1e-5, rtol=1e-5)


def test_decoding_with_the_kv_cache_equals_the_full_forward():
    model = tiny_model()
    images, sizes = torch.rand(3, 12, 32), torch.tensor([[12, 32], [8, 16], [12, 24]])
    ids = decoding.greedy(model, images, sizes, max_new_tokens=6, eos_id=decoding.NO_EOS)  # (3, 6)
    state, first = model.begin_decoding(images, sizes, max_new_tokens=6)
    steps = [first] + [model.step(state, ids[:, t : t + 1])[:, -1] for t in range(5)]
    bos = torch.full((3, 1), model.config.bos_id)
    with torch.no_grad():
        full = model(images, torch.cat([bos, ids[:, :5]], dim=1), sizes=sizes, tgt_lengths=[6, 6, 6])  # (3, 6, V)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # greedy = argmax of the teacher-forced forward on its own output, among the tokens it may generate (not pad)
    allowed = full.index_fill(-1, torch.tensor([model.config.pad_id]), float("-inf"))
    assert torch.equal(allowed.argmax(-1), ids)


def test_alignment_by_hand():
    # Two digits on an 8 x 16 canvas with 4-pixel patches: grid 2 x 4; digit 0 covers columns 0-1,
    # digit 1 (box at left 9) covers most of column 2 (pixels 9-11) and a part of column 3 (12-15).
    owners = C.patch_owners([(0, 0), (0, 9)], (2, 4), 4)
    assert owners.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    cross = torch.tensor([
        [0.30, 0.30, 0.10, 0.00, 0.10, 0.10, 0.05, 0.05],  # word 1: 0.8 on digit 0 -> aligned
        [0.20, 0.10, 0.20, 0.10, 0.10, 0.10, 0.10, 0.10],  # word 2: 0.5 on digit 1 (not more than half) -> not
        [0.00, 0.00, 1.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # word 3: past the last digit -> not aligned
    ])
    assert C.aligned_words(cross, owners, 3) == [True, False, False]
    assert C.aligned_words(cross, owners, 1) == [True]


def test_a_tiny_model_learns_a_tiny_caption_set():
    d = replace(C.DataConfig(), max_height=8, max_width=24, min_digits=2, max_digits=2)
    data = C.canvases("train", 12, d, 4)
    tok = C.build_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size).train()
    batch = C.collate(tok, data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(batch["images"], batch["tgt_in"], sizes=batch["sizes"], tgt_lengths=batch["tgt_lengths"])
        loss = C.sequence_loss(logits, batch["tgt_out"], tok.pad_id, 0.0) / batch["num_targets"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = C.score(model, tok, data)
    assert scores["exact_match"] == 100.0  # 12 captions of 2 digits: chance is 1 in 100 per caption


def test_train_evaluate_caption_and_viz_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["model.d_model=32", "model.d_ff=64", "model.dropout=0.0", "train.steps=40", "train.warmup=5",
            "train.eval_every=40", "train.progress=false", "data.valid_canvases=20", "data.test_canvases=20"]
    assert main(["train", "caption", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    model_dir = json.loads(capsys.readouterr().out)["model"]
    assert isinstance(load(model_dir), Captioner)
    assert main(["evaluate", model_dir, "--data", "test"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"exact_match", "word_accuracy", "alignment"}
    png = tmp_path / "example.png"
    assert main(["caption", model_dir, "--example", str(png)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{png}\t") and "true caption" in said
    assert np.allclose(C.read_png(png, 4), C.canvases("test", 1, C.DataConfig(), 4)[0].image, atol=1 / 255)
    second = tmp_path / "second.png"  # images after --example PNG are images too, not unrecognized arguments
    assert main(["caption", model_dir, "--example", str(second), str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines[:2]] == [str(png), str(second)] and "true caption" in lines[2]
    (tmp_path / "set.tsv").write_text(f"example.png\t{C.canvases('test', 1, C.DataConfig(), 4)[0].caption}\n")
    assert main(["evaluate", model_dir, "--data", str(tmp_path / "set.tsv")]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"exact_match", "word_accuracy"}
    (tmp_path / "bad.tsv").write_text("example.png\tone two\nexample.png\n")
    for data, said in [("bogus", r"bogus: no such file; expected a split \(train, valid, test\) or a TSV"),
                       (str(tmp_path / "bad.tsv"), r"bad\.tsv:2: expected 'image\.png<TAB>caption', got 1 field")]:
        assert main(["evaluate", model_dir, "--data", data]) == 2
        assert re.search(said, capsys.readouterr().err)
    assert main(["viz", model_dir, "--input", str(png), "--out", str(tmp_path / "viz")]) == 0
    written = sorted(p.name for p in (tmp_path / "viz").iterdir())
    assert main(["viz", model_dir, "--input", str(png), "--target", "1 2", "--out", str(tmp_path / "v2")]) == 2
    assert "--target: the caption task's pictures follow the model's own output" in capsys.readouterr().err
    assert "explorer.html" in written and all(n.startswith("word") for n in written if n.endswith(".png"))
    assert main(["translate", model_dir, "x"]) == 2  # a caption model is not a translation model


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        CaptionerConfig(patch_size=0)
    assert C.CaptionConfig().train.metric == "exact_match"


def test_a_three_channel_captioner_summarises_and_names_grey_images():
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(vocab_size=16, d_model=32, num_heads=2, d_ff=64, channels=3))
    assert "Captioner" in str(model.summary())  # its example canvas was one-channel: a reshape error
    with pytest.raises(ValueError, match=r"images must be \(B, 3, Hc, Wc\), got \(2, 8, 16\)"):
        model.encode(torch.zeros(2, 8, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_summary_of_a_captioner_in_another_dtype(dtype):
    # after .to(torch.bfloat16) summary() failed: its example canvas stayed float32 ("mat1 and mat2 must have the
    # same dtype"); a DecoderLM's summary worked. The oracle: the float32 model's table, same shapes and counts.
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig.preset("tiny"))
    expected = model.summary(print_fn=None)
    assert model.to(dtype).summary(print_fn=None) == expected


def test_a_file_that_is_not_an_image_is_one_error(tmp_path):
    from maskattn.tasks.caption import read_png

    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match="notes\\.png: not an image PIL can read; expected a PNG canvas"):
        read_png(tmp_path / "notes.png", 4)


def test_a_missing_directory_or_oversized_image_is_named(tmp_path, capsys):
    from PIL import Image

    from maskattn.tasks.caption import read_png

    with pytest.raises(ValueError, match=r"missing\.png: no such file; expected a PNG canvas"):
        read_png(tmp_path / "missing.png", 4)
    with pytest.raises(ValueError, match=r"pngs: a directory; expected a PNG canvas"):
        (tmp_path / "pngs").mkdir()
        read_png(tmp_path / "pngs", 4)
    Image.fromarray(np.full((9, 30), 255, np.uint8)).save(tmp_path / "wide.png")
    assert read_png(tmp_path / "wide.png", 4, largest=(12, 32)).shape == (12, 32)  # padded to whole patches
    with pytest.raises(ValueError, match=r"wide\.png: 9x30 pixels, larger than the model's 8x32 canvases"):
        read_png(tmp_path / "wide.png", 4, largest=(8, 32))
    # each image is checked against the model alone: the batch error named only the padded batch's size
    from maskattn.tasks.common import write_task

    model = tiny_model()  # 4x4 patches, 4 x 12 of them: 16x48 canvases
    assert C.largest_canvas(model) == (16, 48)
    model_dir = tmp_path / "model"
    model.save(model_dir, tokenizer=C.build_tokenizer())
    write_task(model_dir, {"task": "caption", "data": {}})
    Image.fromarray(np.full((9, 30), 255, np.uint8)).save(tmp_path / "fits.png")  # one canvas of the model's
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(tmp_path / "tall.png")  # 20 rows of pixels: 5 patches
    assert main(["caption", str(model_dir), str(tmp_path / "fits.png")]) == 0
    assert main(["caption", str(model_dir), str(tmp_path / "fits.png"), str(tmp_path / "tall.png")]) == 2
    assert re.search(r"tall\.png: 20x30 pixels, larger than the model's 16x48 canvases", capsys.readouterr().err)


def test_patch_embedding_names_integer_images_and_another_dtype():
    embed = PatchEmbedding(2, 8, max_rows=3, max_cols=4)
    pixels = torch.randint(0, 256, (2, 4, 6), dtype=torch.uint8)  # what torch.from_numpy of a PIL image gives
    for images in (pixels, pixels > 128):
        with pytest.raises(TypeError, match=rf"images must be floating point .*, got {images.dtype}"):
            embed(images)
    with pytest.raises(ValueError, match=r"images \(torch.float64\) and the model \(torch.float32\) must have one "
                                         "dtype outside autocast"):
        embed(pixels.double() / 255)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 pixels for a bf16 projection
        assert embed.to(torch.bfloat16)(pixels.float() / 255).shape == (2, 6, 8)


def test_images_on_another_device_than_the_model_are_refused_by_name():
    # the meta device stands in for a second device: "unknown device type for autocast", naming nothing
    embed = PatchEmbedding(2, 8, max_rows=3, max_cols=4)
    with pytest.raises(ValueError, match=r"images are on meta, the model on cpu; move them with \.to\("):
        embed(torch.zeros(2, 4, 6, device="meta"))
    on_meta = PatchEmbedding(2, 8, max_rows=3, max_cols=4).to("meta")  # shapes only: it runs
    assert on_meta(torch.zeros(2, 4, 6, device="meta")).shape == (2, 6, 8)


def test_patch_embedding_of_an_empty_batch():
    embed = PatchEmbedding(2, 8, max_rows=3, max_cols=4)
    # a batch of none: (0, N, E), as nn.Linear gives for no rows (the reshape to (0, N, -1) failed)
    assert embed(torch.zeros(0, 4, 6)).shape == (0, 6, 8)
    model = tiny_model()
    assert model(torch.zeros(0, 8, 16), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, model.config.vocab_size)


def test_evaluate_names_the_line_of_a_missing_or_unreadable_image(tmp_path, capsys):
    # "[Errno 2] No such file or directory: 'nofile.png'": neither the TSV nor its line, and the name relative to
    # the TSV's directory, not to where the command ran
    from maskattn.tasks.common import write_task

    model_dir = tmp_path / "model"
    tiny_model().save(model_dir, tokenizer=C.build_tokenizer())
    write_task(model_dir, {"task": "caption", "data": {}})
    sets = tmp_path / "sets"
    sets.mkdir()
    C.write_png(C.canvases("test", 1, C.DataConfig(), 4)[0].image, sets / "one.png")
    (sets / "notes.png").write_text("not a picture")
    looked = re.escape(str(sets / "nofile.png"))
    for second, says in [("nofile.png", rf"set\.tsv:2: no image file 'nofile\.png' \(looked for {looked}"),
                         ("one.png ", r"set\.tsv:2: no image file 'one\.png '"),
                         ("notes.png", r"set\.tsv:2: .*notes\.png: not an image PIL can read")]:
        (sets / "set.tsv").write_text(f"one.png\tone two\n{second}\tthree\n")
        assert main(["evaluate", str(model_dir), "--data", str(sets / "set.tsv")]) == 2
        assert re.search(says, capsys.readouterr().err)
    (sets / "set.tsv").write_text("one.png\tone two\n")
    assert main(["evaluate", str(model_dir), "--data", str(sets / "set.tsv")]) == 0


def test_a_tsv_caption_is_its_words_whatever_the_spaces_between_them(tmp_path, monkeypatch):
    # "eight  two one" (two spaces) was never an exact match, though every word was right
    from maskattn.tasks.common import write_task

    model_dir = tmp_path / "model"
    tiny_model().save(model_dir, tokenizer=C.build_tokenizer())
    write_task(model_dir, {"task": "caption", "data": {}})
    C.write_png(C.canvases("test", 1, C.DataConfig(), 4)[0].image, tmp_path / "one.png")
    said = ["eight two one", "three four"]
    monkeypatch.setattr(C, "caption_batch", lambda model, tok, images: (said[: len(images)], None, None))
    (tmp_path / "set.tsv").write_text("one.png\teight  two one \none.png\t three five\n")
    scores = C.evaluate_file(model_dir, str(tmp_path / "set.tsv"))
    assert scores == {"exact_match": 50.0, "word_accuracy": 100 * 4 / 5}  # by hand: 1 of 2 captions, 4 of 5 words


def test_a_captioner_saved_in_bfloat16_captions_its_images(tmp_path, capsys):
    # caption_batch handed the model float32 pixels whatever its dtype: `maskattn caption` and evaluate of a model
    # saved after .to(torch.bfloat16) (load() gives it back so) failed, "images (torch.float32) and the model
    # (torch.bfloat16) must have one dtype outside autocast". The oracle: greedy decoding of the pixels cast by hand.
    from maskattn.tasks.common import write_task

    model, tok = tiny_model().to(torch.bfloat16), C.build_tokenizer()
    for n, canvas in enumerate(C.canvases("test", 2, C.DataConfig(), 4)):
        C.write_png(canvas.image, tmp_path / f"{n}.png")
    images = [C.read_png(tmp_path / f"{n}.png", model.config.patch_size) for n in range(2)]  # what the CLI reads
    said = C.caption_batch(model, tok, images)[0]
    batch, sizes = C.batch_images(images)
    ids = decoding.greedy(model, batch.to(torch.bfloat16), sizes, max_new_tokens=model.config.max_len - 1)
    assert said == [tok.decode(row.tolist()) for row in ids]
    model.save(tmp_path / "model", tokenizer=tok)
    write_task(tmp_path / "model", {"task": "caption", "data": {}})
    pngs = [str(tmp_path / f"{n}.png") for n in range(2)]
    assert main(["caption", str(tmp_path / "model"), *pngs]) == 0
    assert capsys.readouterr().out == "".join(f"{png}\t{line}\n" for png, line in zip(pngs, said, strict=True))
    assert main(["viz", str(tmp_path / "model"), "--input", pngs[0], "--out", str(tmp_path / "viz")]) == 0
    assert (tmp_path / "viz" / "explorer.html").is_file()


@pytest.mark.parametrize("setting, message", [
    ("data.max_digits=1", "data.max_digits (1) must be >= min_digits (2)"),  # was numpy's "low >= high"
    ("data.min_digits=0", "data.min_digits must be an int >= 1, got 0"),  # was "no canvas of 0 scans fits"
    ("data.batch_size=0", "data.batch_size must be an int >= 1, got 0"),  # was "range() arg 3 must not be zero"
    ("data.epoch_canvases=-1", "data.epoch_canvases must be an int >= 1, got -1"),
    ("data.split_seed=-1", "data.split_seed must be an int in [0, 2**63), got -1"),
])
def test_caption_data_settings_out_of_range_are_refused_naming_them(setting, message, tmp_path, capsys):
    assert main(["train", "caption", "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"maskattn train: {message}", err
    assert not (tmp_path / "run").exists()  # refused before the run directory or the scans were touched


def test_caption_example_writes_only_a_png_never_over_another_file(tmp_path, capsys):
    # `caption MODEL --example data.tsv` wrote the canvas over data.tsv (any existing file) and exited 0
    from maskattn.tasks.common import write_task

    tiny_model().save(tmp_path / "model", tokenizer=C.build_tokenizer())
    write_task(tmp_path / "model", {"task": "caption", "data": {}})
    data = tmp_path / "train.tsv"
    data.write_text("image\tcaption\n")
    assert main(["caption", str(tmp_path / "model"), "--example", str(data)]) == 2
    assert f"--example {data}: name a .png file" in capsys.readouterr().err
    assert data.read_text() == "image\tcaption\n"
    assert main(["caption", str(tmp_path / "model"), "--example", str(tmp_path / "new.PNG")]) == 0
    assert (tmp_path / "new.PNG").read_bytes().startswith(b"\x89PNG")  # the oracle: PNG's own signature


def test_an_int8_captioner_captions_and_its_patch_tokens_are_the_int8_product(tmp_path, capsys):
    # `compress --int8` quantises the patch projection too; PatchEmbedding then read the model's dtype from its
    # int8 weight and refused every image: "images (torch.float32) and the model (torch.int8) must have one
    # dtype", so `caption` and `evaluate` of the compressed model failed. Oracle: unfold + the per-token int8
    # product from the stored int8 weights and scales, by hand; greedy decoding of the in-memory int8 model.
    from maskattn.models import compressed
    from maskattn.tasks.common import write_task

    model, tok = tiny_model(), C.build_tokenizer()
    model.save(tmp_path / "model", tokenizer=tok)
    write_task(tmp_path / "model", {"task": "caption", "data": {}})
    assert main(["compress", str(tmp_path / "model"), "--out", str(tmp_path / "int8"), "--int8"]) == 0
    assert "patches.proj" in json.loads(capsys.readouterr().out)["int8"]
    quantised = load(tmp_path / "int8").eval()
    images = torch.rand(2, 8, 12)
    proj = quantised.patches.proj
    x = torch.nn.functional.unfold(images[:, None], 4, stride=4).transpose(1, 2).double()  # (B, N, 16), row-major
    sx = x.abs().amax(-1, keepdim=True) / 127
    by_hand = (torch.round(x / sx) @ proj.weight.double().T) * sx * proj.weight_scale.double() + proj.bias.double()
    positions = quantised.patches.rows.weight[:2, None] + quantised.patches.cols.weight[None, :3]  # (2, 3, E)
    with torch.no_grad():
        torch.testing.assert_close(quantised.patches(images), (by_hand + positions.reshape(6, -1)).float())
    for n, canvas in enumerate(C.canvases("test", 2, C.DataConfig(), 4)):
        C.write_png(canvas.image, tmp_path / f"{n}.png")
    pngs = [str(tmp_path / f"{n}.png") for n in range(2)]
    in_memory = compressed.quantize_linears(model, tied=True) and model
    said = C.caption_batch(in_memory, tok, [C.read_png(png, 4) for png in pngs])[0]
    assert main(["caption", str(tmp_path / "int8"), *pngs]) == 0
    assert capsys.readouterr().out == "".join(f"{png}\t{line}\n" for png, line in zip(pngs, said, strict=True))
    assert main(["evaluate", str(tmp_path / "int8"), "--data", "test"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"exact_match", "word_accuracy", "alignment"}


def test_a_16_bit_grey_png_reads_as_the_same_picture_as_its_8_bit_copy(tmp_path):
    # PIL's convert("L") clips 16-bit grey levels at 255 instead of scaling them: a 16-bit PNG (what scientific
    # tools write) read as white everywhere but its darkest pixels, and was captioned without a word. Oracle: the
    # same picture saved as an 8-bit PNG, and the 16-bit levels / 65535 by hand.
    from PIL import Image

    levels = np.linspace(0, 65535, 9 * 13).reshape(9, 13).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    Image.fromarray((levels / 257).round().astype(np.uint8)).save(tmp_path / "flat.png")
    deep = C.read_png(tmp_path / "deep.png", 4)
    assert deep.shape == (12, 16) and np.allclose(deep[:9, :13], levels / 65535, atol=1e-6)
    assert np.abs(deep - C.read_png(tmp_path / "flat.png", 4)).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("setting, message", [
    # each failed at the first batch, naming no setting: "images of 16x48 pixels: larger than the model's 8x64 (its
    # patch positions)", "images must be (B, 3, Hc, Wc), got (64, 16, 48)", "tgt has 5 tokens, more than the model's
    # max_len (3)"
    ("model.max_rows=2", "data.max_height (16) makes canvases of 4 rows of model.patch_size (4) pixels; "
                         "model.max_rows (2) must be at least 4"),
    ("model.max_cols=11", "data.max_width (48) makes canvases of 12 columns of model.patch_size (4) pixels; "
                          "model.max_cols (11) must be at least 12"),
    ("model.channels=3", "model.channels must be 1 (the digit canvases are grey), got 3"),
    ("model.max_len=4", "model.max_len (4) must be at least data.max_digits + 1 (5): BOS and a word per digit"),
])
def test_caption_model_settings_that_do_not_fit_the_canvases_are_refused_naming_them(setting, message, tmp_path,
                                                                                      capsys):
    assert main(["train", "caption", "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"maskattn train: {message}", err
    assert not (tmp_path / "run").exists()


def test_word_accuracy_counts_the_true_captions_words(monkeypatch):
    # Oracle written out: position-by-position right words over the words of the true captions, so a model that
    # says fewer words cannot score higher (a denominator of generated words gave 100% to captions cut short).
    d = replace(C.DataConfig(), max_height=8, max_width=24, min_digits=2, max_digits=2)
    model = tiny_model()
    p = model.config.patch_size
    data = C.canvases("train", 3, d, p)
    first = C.NAMES[data[1].digits[0]]
    said = [data[0].caption, first, ""]  # all right; first word only; nothing
    grid = (max(c.image.shape[0] for c in data) // p) * (max(c.image.shape[1] for c in data) // p)
    monkeypatch.setattr(C, "caption_batch", lambda m, t, images: (said, [{"cross": torch.zeros(3, 1, 3, grid)}], None))
    scores = C.score(model, C.build_tokenizer(), data)
    assert scores["word_accuracy"] == pytest.approx(100 * (2 + 1 + 0) / 6)
    assert scores["exact_match"] == pytest.approx(100 / 3)
