"""The README's newcomer commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    command = ci_lines[-1]
    assert "pytest" in command
    readme_head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert command in readme_head


def _synopses(readme: str) -> dict[str, set[str]]:
    """The options each `vlmguard CMD ...` line of the README's bash blocks shows."""
    import re

    found: dict[str, set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        text = re.sub(r"\\\n", " ", block)
        text = re.sub(r"\n\s+(?=\[|--)", " ", text)  # indented continuation lines
        for line in text.splitlines():
            match = re.match(r"\s*vlmguard ((?:eval-data |detector )?[\w-]+)", line)
            if match:
                found.setdefault(match.group(1), set()).update(re.findall(r"--[\w-]+", line))
    return found


def test_every_option_help_lists_is_in_the_readme_synopsis():
    import click

    from vlmguard.cli import main

    readme = (ROOT / "README.md").read_text()
    synopses = _synopses(readme)
    # the converters' shared options are named once, in prose
    assert "every `eval-data` converter also takes `--limit N` and `--per-category N`" in readme
    missing = []

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
            return
        name = " ".join(path)
        shown = synopses.get(name, set())
        if path[0] == "eval-data" and name != "eval-data render-figstep":
            shown |= {"--limit", "--per-category"}
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                missing.extend(
                    [
                        f"{name} {o}"
                        for o in param.opts
                        if o.startswith("--") and o not in shown and o != "--help"
                    ]
                )

    walk(main, [])
    assert not missing


def test_readme_documents_the_cpu_torch_index_and_every_policy_key():
    from dataclasses import fields

    from vlmguard.runtime.policy import GuardPolicy

    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    texts = {"oh_safety_instruction", "oh_refusal_opening", "align_safety_prefix"}
    for field in fields(GuardPolicy):
        if field.name not in texts:  # "the safety texts"
            assert f"`{field.name}`" in readme, field.name
