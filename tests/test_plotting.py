import subprocess
import sys

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
