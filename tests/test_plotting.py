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
