"""The README's usage example runs as written, and its test command is what CI runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(section)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {section!r}"
    return match.group(1)


def test_usage_example_runs(capsys):
    exec(compile(_python_block("## Usage"), "README-usage", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) > 0  # the loss of the last step


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "# tests: what CI runs" in README.read_text()
    assert "'/^# tests: what CI runs/" in ci  # .ci/run reads the command from the README
