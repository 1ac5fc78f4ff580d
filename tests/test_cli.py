import subprocess
import sys

from maskattn.cli import main


def test_demo_draws_masks_and_agrees_with_torch(capsys):
    assert main(["demo", "--length", "6"]) == 0
    out = capsys.readouterr().out
    assert "causal()  [Lq=6, Lk=6]" in out
    assert "prefix_lm(3)" in out and "document(" in out and "from_tensor(" in out
    worst = float(out.rsplit("= ", 1)[1])
    assert worst < 1e-12


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "maskattn", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
