"""Every ```python block of README.md runs as written, on its own, as a user pastes it (issue 16).

The blocks of the "Using maskattn with Hugging Face" section run in tests/test_hf.py, which also checks
their printed output; they are not run twice. A block that imports an optional package that is not
installed (the pretrained MiniLM files) is skipped, naming the package. Each block runs in a fresh
temporary working directory.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HF_SECTION = "## Using maskattn with Hugging Face"


def _blocks() -> list[tuple[int, str]]:
    """(line, code) of each python block outside the Hugging Face section."""
    text = README.read_text(encoding="utf-8")
    before, _, rest = text.partition(HF_SECTION)
    after = rest.split("\n## ", 1)[1] if "\n## " in rest else ""
    found = []
    for part, offset in ((before, 0), (after, len(text) - len(after))):
        for match in re.finditer(r"```python\n(.*?)```", part, re.S):
            found.append((text.count("\n", 0, offset + match.start()) + 1, match.group(1)))
    return found


BLOCKS = _blocks()


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs_on_its_own(line, code, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes (the export example's lm.onnx) land here, not in the repo
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] in ("maskattn", "torch"):
            raise
        pytest.skip(f"README.md:{line} needs the optional package {e.name!r}")
