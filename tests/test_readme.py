"""The README's example runs as written, and its test line is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "trainable params: 592 " in out  # rank 4 on query (16→64) and value (64→4): 4·80 + 4·68
    loss = float(re.search(r"loss (\d+\.\d+)", out).group(1))
    assert loss < 0.1


def test_ci_runs_the_readme_test_line():
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if "pytest" in l and not l.startswith("#"))
    assert line.strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_checkpoint_example_runs():
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    assert "ckpt.restore()" in block
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # its asserts check the restored trees
