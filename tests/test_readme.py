"""The README's newcomer commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    command = ci_lines[-1]
    assert "pytest" in command
    readme_head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert command in readme_head
