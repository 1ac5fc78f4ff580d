import contextlib
import subprocess
import sys
from pathlib import Path

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
    assert ax.get_title() == repr(mask)


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
