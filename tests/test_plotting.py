import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskattn import masks
from maskattn.plotting import plot_mask, plot_tradeoff

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_mask_draws_the_grid_and_writes_a_png(tmp_path):
    mask = masks.causal() & masks.padding([3, 5])
    ax = plot_mask(mask, 4, 5, batch=1, path=str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
    drawn = torch.from_numpy(ax.images[0].get_array().data)
    assert torch.equal(drawn.bool(), mask.to_dense(4, 5)[1, 0])
    assert ax.get_title() == f"{mask!r}, batch 1"  # the picture names the batch item it shows


def test_masks_do_not_import_matplotlib():
    code = "import sys, maskattn.masks, maskattn.dispatch; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_tradeoff_draws_one_panel_per_task(tmp_path):
    panels = {"translation": [("base", 10.0, 35.0), ("int8", 4.0, 34.8)], "classification": [("base", 90.0, 91.0)]}
    out = plot_tradeoff(panels, tmp_path / "t.png", xlabel="file MB", ylabels={"translation": "BLEU"})
    assert out.read_bytes()[:8] == PNG


def test_curves_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import json

    from matplotlib.figure import Figure

    from maskattn.plotting import plot_curves

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    first = plot_curves(log).read_bytes()
    assert first.startswith(b"\x89PNG")

    def dies_half_way(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 5, "loss": 0.1}) + "\n")
    with contextlib.suppress(KeyboardInterrupt):
        plot_curves(log)
    assert (tmp_path / "curves.png").read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == [
        "curves.png", "metrics.jsonl"]


def _picture_writers() -> dict:
    """``{file name: draw(out_dir, weight)}`` for every picture writer; ``weight`` changes what is drawn."""
    import numpy as np

    from maskattn import explorer
    from maskattn.plotting import plot_overlays
    from maskattn.tasks.base import Overlay
    from maskattn.viz import head_grid, heatmap

    w = lambda weight: torch.full((2, 3, 4), weight)  # noqa: E731  (H, Lq, Lk)
    mask = lambda weight: masks.causal() & masks.sliding_window(1 + round(4 * weight))  # noqa: E731
    overlay = lambda weight: Overlay("word1_one", "word 1", np.zeros((8, 8), np.float32), np.full((2, 2), weight))  # noqa: E731
    return {
        "h.png": lambda out, weight: heatmap(w(weight)[0], out / "h.png"),
        "g.png": lambda out, weight: head_grid(w(weight), out / "g.png"),
        "m.png": lambda out, weight: plot_mask(mask(weight), 4, path=str(out / "m.png")),
        "m.svg": lambda out, weight: plot_mask(mask(weight), 4, path=str(out / "m.svg")),
        "word1_one.png": lambda out, weight: plot_overlays([overlay(weight)], out),
        "t.png": lambda out, weight: plot_tradeoff({"t": [("a", 1.0, weight)]}, out / "t.png"),
        "explorer.html": lambda out, weight: explorer.write_page(
            [explorer.attention_record("a", "k", 0, w(weight), list("abc"), list("abcd"))], out / "explorer.html"),
    }


def test_every_picture_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    writers = _picture_writers()
    for draw in writers.values():
        draw(tmp_path, 0.25)
    before = {name: (tmp_path / name).read_bytes() for name in writers}
    assert before["m.svg"].lstrip().startswith(b"<?xml") and before["h.png"][:8] == PNG
    assert before["m.png"][:8] == PNG and before["explorer.html"].startswith(b"<!doctype html>")

    def dies_half_way(write):
        def half(self, target, *args, **kwargs):
            write(self, target, *args, **kwargs)
            path = self if isinstance(self, Path) else Path(target)
            path.write_bytes(path.read_bytes()[:20])  # a kill while writing leaves the first bytes
            raise KeyboardInterrupt

        return half

    monkeypatch.setattr(Figure, "savefig", dies_half_way(Figure.savefig))
    monkeypatch.setattr(Path, "write_text", dies_half_way(Path.write_text))
    for name, draw in writers.items():
        with contextlib.suppress(KeyboardInterrupt):
            draw(tmp_path, 0.75)
        assert (tmp_path / name).read_bytes() == before[name], f"{name} was left half written"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)


def test_a_picture_name_without_a_suffix_gets_png_as_savefig_gives_it(tmp_path):
    # the pictures went through fig.savefig, which writes "attn" as attn.png; written whole-or-nothing they came out
    # as "attn", no suffix, while heatmap returned a path and plot_mask's file lost the name a caller opened
    from matplotlib.figure import Figure

    from maskattn.viz import head_grid, heatmap

    Figure().savefig(tmp_path / "oracle")  # matplotlib's own naming
    assert [p.name for p in tmp_path.iterdir()] == ["oracle.png"]
    w = torch.rand(2, 3, 4)
    assert heatmap(w[0], tmp_path / "h") == tmp_path / "h.png"
    assert head_grid(w, str(tmp_path / "g")) == tmp_path / "g.png"
    assert plot_tradeoff({"t": [("a", 1.0, 2.0)]}, tmp_path / "t") == tmp_path / "t.png"
    plot_mask(masks.causal(), 4, path=str(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "h.png", "m.png", "oracle.png", "t.png"]
    assert all(p.read_bytes()[:8] == PNG for p in tmp_path.iterdir())


def _drawn_curves(tmp_path, monkeypatch, records):
    """The figure plot_curves draws for ``records`` (a metrics.jsonl's lines), caught before it is saved."""
    import json

    from maskattn import plotting

    drawn = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, out, **kwargs: drawn.append(fig) or out)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plotting.plot_curves(log)
    return drawn[0]


def _lines(ax) -> list[tuple[list, list]]:
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]


def test_curves_put_validation_loss_beside_training_loss_and_each_other_metric_on_its_own_axis(tmp_path,
                                                                                             monkeypatch):
    # every evaluation metric shared one unlabelled axis (an LM's loss ~4 flattened beside its perplexity ~55), and
    # the validation loss was on another panel than the training loss, so overfitting could not be seen
    train = [{"step": s, "loss": 5.0 - 0.5 * s, "lr": 1e-3} for s in range(1, 7)]
    evals = [{"step": s, "eval_loss": 4.0 - 0.1 * s, "eval_perplexity": 60.0 - s, "eval_bleu": 2.0 * s} for s in (3, 6)]
    fig = _drawn_curves(tmp_path, monkeypatch, [*train[:3], evals[0], *train[3:], evals[1]])
    loss, *others = fig.axes
    assert loss.get_ylabel() == "loss"
    assert _lines(loss) == [([r["step"] for r in train], [r["loss"] for r in train]),
                            ([3, 6], [r["eval_loss"] for r in evals])]
    assert [line.get_label() for line in loss.get_lines()] == ["training", "validation"]
    assert sorted(ax.get_ylabel() for ax in others) == ["bleu", "perplexity"]  # one axis each, named
    for ax in others:
        assert _lines(ax) == [([3, 6], [r[f"eval_{ax.get_ylabel()}"] for r in evals])]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)


def test_curves_without_an_evaluation_are_the_training_loss_alone(tmp_path, monkeypatch):
    train = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    fig = _drawn_curves(tmp_path, monkeypatch, train)
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "loss" and fig.axes[0].get_xlabel() == "step"
    assert _lines(fig.axes[0]) == [([1, 2, 3, 4], [r["loss"] for r in train])]


def test_a_metrics_log_line_that_is_not_a_record_is_named_with_its_file_and_line(tmp_path):
    # a cut or hand-edited line was JSONDecodeError "Unterminated string ...", AttributeError "'int' object has no
    # attribute 'startswith'" or KeyError 'step', naming no file; blank and spaces-only lines are skipped
    from maskattn.io import FormatError
    from maskattn.plotting import plot_curves

    log = tmp_path / "metrics.jsonl"
    for line in ('{"step": 2, "lo', "[1, 2]", '{"loss": 2.0}'):
        log.write_text('{"step": 1, "loss": 2.0}\n  \n' + line + "\n")
        try:
            plot_curves(log)
        except FormatError as e:
            assert str(e).startswith(f"{log}, line 3: ")
        else:
            raise AssertionError(f"accepted {line!r}")
    assert not (tmp_path / "curves.png").exists()
    log.write_text('{"step": 1, "loss": 2.0}\n  \n\n')
    assert plot_curves(log) == tmp_path / "curves.png"


def _pixel_faults(ax, dense, q_offset=0):
    """Read plot_mask's picture back from the rendered pixels and compare it with ``dense`` (Lq, Lk): (dark pixels
    over no allowed entry, allowed entries drawn with no dark pixel). A pixel is checked against the entries within a
    pixel of it, widened to the blocks the title says each cell stands for."""
    import re

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)  # (plot_mask closed its own figure after writing it)
    ax.spines[:].set_visible(False)  # the frame and tick marks are dark too
    ax.tick_params(length=0)
    canvas.draw()
    dark = np.asarray(canvas.buffer_rgba())[..., :3].mean(-1) < 128  # (rows, cols), row 0 at the top
    height = dark.shape[0]
    box = ax.get_window_extent()
    c0, c1 = int(np.ceil(box.x0)), int(np.floor(box.x1))
    r0, r1 = int(np.ceil(height - box.y1)), int(np.floor(height - box.y0))
    dark = dark[r0:r1, c0:c1]
    said = re.search(r"each cell (\d+) queries x (\d+) keys: dark where any of them may attend", ax.get_title())
    fq, fk = (int(said[1]), int(said[2])) if said else (1, 1)
    lq, lk = dense.shape
    to_data = ax.transData.inverted()
    xs = to_data.transform(np.stack([np.arange(c0, c1 + 1), np.full(c1 - c0 + 1, 0.0)], 1))[:, 0]  # pixel edges
    ys = to_data.transform(np.stack([np.full(r1 - r0 + 1, 0.0), height - np.arange(r0, r1 + 1)], 1))[:, 1]

    def cell_range(edges, size, block, offset):  # the cells within a pixel of each pixel, widened to whole blocks
        lo = np.floor(np.minimum(edges[:-1], edges[1:]) - offset + 0.5 - abs(edges[1] - edges[0])).astype(int)
        hi = np.floor(np.maximum(edges[:-1], edges[1:]) - offset + 0.5 + abs(edges[1] - edges[0])).astype(int) + 1
        return np.clip(lo // block * block, 0, size), np.clip(-(-hi // block) * block, 0, size)

    k_lo, k_hi = cell_range(xs, lk, fk, 0)
    q_lo, q_hi = cell_range(ys, lq, fq, q_offset)
    sums = np.pad(dense.numpy().astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    near = (sums[q_hi[:, None], k_hi[None]] - sums[q_lo[:, None], k_hi[None]] - sums[q_hi[:, None], k_lo[None]]
            + sums[q_lo[:, None], k_lo[None]])  # allowed entries near each pixel
    shown_wrongly = int((dark & (near == 0)).sum())
    # each allowed entry: some dark pixel within a pixel of its cell (xs and ys increase rightwards and downwards)
    dsum = np.pad(dark.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    qs, ks = np.nonzero(dense.numpy())
    span = lambda edges, cells, size: (np.clip(np.searchsorted(edges, cells - 0.5) - 2, 0, size),  # noqa: E731
                                       np.clip(np.searchsorted(edges, cells + 0.5) + 1, 0, size))
    ra, rb = span(ys, qs + q_offset, dark.shape[0])
    ca, cb = span(xs, ks, dark.shape[1])
    drawn = dsum[rb, cb] - dsum[ra, cb] - dsum[rb, ca] + dsum[ra, ca]
    return shown_wrongly, int((drawn == 0).sum())


def _allowed(pred, q_len, k_len, q_offset=0):
    """An (Lq, Lk) mask written out from ``arange`` positions: the oracle the pictures are compared with."""
    q, k = torch.arange(q_offset, q_offset + q_len).view(-1, 1), torch.arange(k_len).view(1, -1)
    return pred(q, k).expand(q_len, k_len)


def _doc(position):
    return (position >= 300).long() + (position >= 700).long()  # documents of 300, 400 and 300 positions


def _scatter(n):
    q, k = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    return (k == (3 * q) % n) & (q % 7 == 2)  # isolated entries: no neighbour drawn in for a missing one


@pytest.mark.parametrize("case", ["window", "prefix", "padding", "document", "anticausal", "heads", "scatter"])
def test_plot_mask_pixels_show_the_dense_mask(case, tmp_path):
    """The picture, read back pixel by pixel, against the mask written out from positions: every allowed entry
    dark, no dark pixel where nothing may attend, queries down from q_offset, keys across, the chosen batch
    item and head; masks longer than the picture's pixels included."""
    heads = torch.zeros(1, 3, 20, 20, dtype=torch.bool)
    heads[0, 2, :, 5] = True
    cases = {  # mask, q_len, k_len, q_offset, batch, head, oracle
        "window": (masks.causal() & masks.sliding_window(3), 10, 15, 5, 0, 0,
                   _allowed(lambda q, k: (k <= q) & (k > q - 3), 10, 15, 5)),
        "prefix": (masks.prefix_lm(200), 700, 900, 100, 0, 0,
                   _allowed(lambda q, k: (k <= q) | (k < 200), 700, 900, 100)),
        "padding": (masks.padding([9, 4]), 6, 12, 0, 1, 0, _allowed(lambda q, k: k < 4, 6, 12)),
        "document": (masks.document(torch.tensor([[0] * 300 + [1] * 400 + [2] * 300])), 1000, 1000, 0, 0, 0,
                     _allowed(lambda q, k: _doc(q) == _doc(k), 1000, 1000)),
        "anticausal": (~masks.causal(), 300, 300, 0, 0, 0, _allowed(lambda q, k: k > q, 300, 300)),
        "heads": (masks.from_tensor(heads), 20, 20, 0, 0, 2, heads[0, 2]),
        "scatter": (masks.from_tensor(_scatter(1024)), 1024, 1024, 0, 0, 0, _scatter(1024)),
    }
    mask, q_len, k_len, q_offset, batch, head, oracle = cases[case]
    import matplotlib.pyplot as plt
    drawn = plot_mask(mask, q_len, k_len, q_offset=q_offset, batch=batch, head=head, path=str(tmp_path / "m.png"))
    assert _pixel_faults(drawn, oracle, q_offset) == (0, 0)  # as `masks show --png` draws it
    fig = plt.figure(figsize=(6, 6), dpi=100)  # into a caller's axes (here 480 px for up to 1,024 positions)
    assert _pixel_faults(plot_mask(mask, q_len, k_len, q_offset=q_offset, batch=batch, head=head,
                                   ax=fig.add_axes((0.1, 0.1, 0.8, 0.8))), oracle, q_offset) == (0, 0)
    plt.close(fig)


@pytest.mark.parametrize("q_len,k_len", [(0, 4), (4, 0), (0, 0)])
def test_plot_mask_of_no_positions_is_refused_naming_them(q_len, k_len, tmp_path):
    # q_len=0 drew an empty picture until the block drawing (030da67) divided by its block size, 0: a
    # ZeroDivisionError, as k_len=0 already was (the figure's aspect ratio)
    with pytest.raises(ValueError, match=rf"q_len={q_len} and k_len={k_len}: .*at least one query and one key"):
        plot_mask(masks.causal(), q_len, k_len, path=str(tmp_path / "m.png"))
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("length,cells", [(256, 256), (257, 129), (512, 256), (513, 171)])
def test_plot_mask_draws_one_cell_a_position_up_to_max_cells_and_the_fewest_positions_a_cell_beyond(length, cells):
    # Oracle, by hand: a side of up to 256 positions is drawn one cell a position; beyond, each cell is the
    # fewest positions that make it fit (ceil(length / 256)), and the title says how many.
    import matplotlib.pyplot as plt

    ax = plot_mask(masks.causal(), length, length)
    per_cell = -(-length // 256)
    assert ax.get_images()[0].get_array().shape == (cells, cells)
    assert ("each cell" in ax.get_title()) == (per_cell > 1)
    assert per_cell == 1 or f"each cell {per_cell} queries x {per_cell} keys" in ax.get_title()
    plt.close(ax.figure)
