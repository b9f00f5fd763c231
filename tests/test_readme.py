"""The README's Python API example runs as written."""
import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "dpo" in out and "simpo" in out and "tdpo" in out


def test_readme_opens_with_the_two_commands():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[0:2] for line in first_block.strip().splitlines()] == [["make", "train"], ["make", "test"]]
