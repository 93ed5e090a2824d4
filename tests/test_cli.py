"""The command line's shared behaviour: one-line user errors, --debug, help sections, extras."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from vlmguard.cli import DEVELOPER_TOOLS, USER_COMMANDS, main
from vlmguard.errors import (
    BundleError,
    InputDataError,
    InputNotFoundError,
    MissingExtraError,
    OutputExistsError,
    UsageError,
    VlmguardError,
    require_extra,
)

EXPORT_LINE = "this command needs the export extra ({} is missing): pip install 'vlmguard[export]'"
PLOT_LINE = (
    "this command needs the plot extra (matplotlib is missing): pip install 'vlmguard[plot]'"
)

# Runs `code` with the named modules made unimportable, as on a runtime-only install.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _without(modules: tuple[str, ...], code: str, *args: str) -> subprocess.CompletedProcess:
    """Run python code in a fresh interpreter where `modules` cannot be imported."""
    prelude = BLOCKER.format(blocked=set(modules))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _lines(output: str) -> list[str]:
    """The non-empty lines of a command's output."""
    return [line for line in output.splitlines() if line.strip()]


# ------------------------------------------------------------------ the error hierarchy


def test_user_errors_derive_from_the_builtins_callers_catch():
    assert issubclass(UsageError, ValueError) and issubclass(InputDataError, ValueError)
    assert issubclass(InputNotFoundError, FileNotFoundError)
    assert issubclass(OutputExistsError, FileExistsError)
    for cls in (UsageError, InputDataError, InputNotFoundError, MissingExtraError, BundleError):
        assert issubclass(cls, VlmguardError)


def test_a_user_error_is_one_line_and_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "has no guard_config.json" in lines[0]
    assert isinstance(result.exception, SystemExit)  # handled, not escaped


@pytest.mark.parametrize("error", [KeyError("internal"), ValueError("a bug, not the user")])
def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, error):
    import vlmguard.integrity

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(vlmguard.integrity, "verify_bundle", broken)
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert result.exception is error  # propagated as is: Python prints its traceback
    assert not result.output.startswith("Error:")


def test_an_internal_error_in_a_subpackage_command_propagates(tmp_path, monkeypatch):
    import vlmguard.calibration.datasets.typography as typography

    def broken(*args, **kwargs):
        raise KeyError("font table")

    monkeypatch.setattr(typography, "render_figstep", broken)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["eval-data", "render-figstep", "--text", "hi", "--out", out])
    assert isinstance(result.exception, KeyError)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["--debug", "verify", str(tmp_path)])
    assert isinstance(result.exception, BundleError)
    monkeypatch.setenv("VLMGUARD_DEBUG", "1")
    result = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert isinstance(result.exception, BundleError)
    monkeypatch.setenv("VLMGUARD_DEBUG", "0")
    assert CliRunner().invoke(main, ["verify", str(tmp_path)]).exit_code == 1


def test_debug_in_a_real_process(tmp_path):
    code = "from vlmguard.cli import main; main()"
    for debug in ([], ["--debug"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *debug, "verify", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1
        if debug:
            assert "Traceback" in done.stderr and "BundleError" in done.stderr
        else:
            assert _lines(done.stderr) == [_lines(done.stderr)[0]]
            assert done.stderr.startswith("Error: ") and "Traceback" not in done.stderr


def test_a_bad_comma_list_is_one_line():
    runner = CliRunner()
    for value, message in (("oh,nope", "unknown defense(s) nope"), ("oh,none", "'none' cannot")):
        result = runner.invoke(main, ["export", "x", "--out", "y", "--defenses", value])
        assert result.exit_code == 1 and message in result.output
        assert len(_lines(result.output)) == 1
    result = runner.invoke(main, ["eval-data", "vlguard", "d", "--out", "o", "--subsets", "x"])
    assert result.exit_code == 1 and "unknown VLGuard subset(s) x" in result.output


# ------------------------------------------------------------------ help


def test_help_is_grouped_into_user_commands_and_developer_tools():
    text = CliRunner().invoke(main, ["--help"]).output
    assert "--debug" in text
    user, _, developer = text.partition("Developer tools:")
    assert "User commands:" in user
    listed_user = {line.split()[0] for line in _lines(user.split("User commands:")[1])}
    listed_dev = {line.split()[0] for line in _lines(developer)}
    assert listed_user == set(USER_COMMANDS) and listed_dev == set(DEVELOPER_TOOLS)
    assert set(main.commands) == listed_user | listed_dev
    assert "detect" in listed_user and "detector" in listed_dev


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand, as argument lists."""
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
    return paths


def test_every_command_documents_its_options_consistently():
    runner = CliRunner()
    for path in _command_paths(main):
        text = runner.invoke(main, [*path, "--help"]).output
        assert "Usage: " in text, path
        assert "--new-tokens " not in text and "--provider " not in text, path
    for path in (("run",), ("eval",), ("bench",), ("detect",)):
        assert "--providers LIST" in runner.invoke(main, [*path, "--help"]).output, path
    for path in (("run",), ("eval",), ("bench",), ("demo",)):
        assert "--max-new-tokens" in runner.invoke(main, [*path, "--help"]).output, path


# ------------------------------------------------------------------ runtime-only installs


def test_require_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"plot extra \(matplotlib is missing\)"):
        require_extra("plot")


OFFLINE = {
    "export": ["export", "x", "--out", "{tmp}/b"],
    "tiny-model": ["tiny-model", "{tmp}/m"],
    "calibrate": ["calibrate", "x", "--data", "d.jsonl", "--out", "p.json"],
    "detector export": ["detector", "export", "x", "--out", "{tmp}/d"],
    "bench --model-shape": ["bench", "--model-shape", "tiny"],
    "bench --vs-torch": ["bench", "{tmp}/b", "--vs-torch", "auto"],
    "demo": ["demo", "--workdir", "{tmp}/demo"],
}


def test_offline_commands_on_a_runtime_only_install(tmp_path):
    """Each says in one line which extra to install and exits 1; every --help still works."""
    code = """
        import json, sys
        import click
        from click.testing import CliRunner
        from vlmguard.cli import main
        cases = json.loads(sys.argv[1])
        out = {}
        for name, args in cases.items():
            r = CliRunner().invoke(main, args)
            out[name] = [r.exit_code, r.output, repr(r.exception)]
        def paths(group, prefix=()):
            for name, command in group.commands.items():
                yield (*prefix, name)
                if isinstance(command, click.Group):
                    yield from paths(command, (*prefix, name))
        for path in paths(main):
            r = CliRunner().invoke(main, [*path, "--help"])
            out["help " + " ".join(path)] = [r.exit_code, r.output[:40], repr(r.exception)]
        print(json.dumps(out))
        bad = [m for m in ("torch", "transformers", "onnx") if m in sys.modules]
        assert not bad, bad
    """
    cases = {k: [a.format(tmp=tmp_path) for a in v] for k, v in OFFLINE.items()}
    blocked = ("torch", "transformers", "onnx", "onnxscript", "safetensors")
    done = _without(blocked, code, json.dumps(cases))
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name in OFFLINE:
        exit_code, output, _ = results[name]
        assert exit_code == 1, (name, output)
        assert _lines(output) == ["Error: " + EXPORT_LINE.format("torch")], name
    helps = {k: v for k, v in results.items() if k.startswith("help ")}
    assert len(helps) == len(_command_paths(main))
    for name, (exit_code, output, error) in helps.items():
        assert exit_code == 0 and output.startswith("Usage:"), (name, error)


def test_the_extra_message_from_a_real_process(tmp_path):
    code = "from vlmguard.cli import main; main()"
    done = _without(("torch",), code, "tiny-model", str(tmp_path / "m"))
    assert done.returncode == 1
    assert _lines(done.stderr) == ["Error: " + EXPORT_LINE.format("torch")]
    assert "Traceback" not in done.stderr


def test_plot_and_report_check_matplotlib_before_any_work(tmp_path):
    code = """
        import json, sys
        from click.testing import CliRunner
        from vlmguard.cli import main
        out = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
        print(json.dumps([[r.exit_code, r.output] for r in out]))
    """
    cases = [
        ["bench", str(tmp_path / "no-bundle"), "--plot", str(tmp_path / "p.png")],
        ["calibrate", "x", "--data", "d", "--out", "p", "--report", str(tmp_path / "r")],
    ]
    done = _without(("matplotlib",), code, json.dumps(cases))
    assert done.returncode == 0, done.stderr
    for exit_code, output in json.loads(done.stdout):
        assert exit_code == 1 and _lines(output) == ["Error: " + PLOT_LINE]


def test_importing_the_runtime_leaves_torch_out():
    code = (
        "import sys, vlmguard.runtime, vlmguard.cli, vlmguard.runtime.guarded_vlm\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ options


def test_detect_takes_providers_like_run(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "white").save(image)
    runner = CliRunner()
    for providers in ("cpu", "CPUExecutionProvider", " cpu , "):
        result = runner.invoke(main, ["detect", "default", str(image), "--providers", providers])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["detect", "default", str(image), "--providers", "rocm"])
    assert result.exit_code == 1 and "not offered" in result.output
    assert len(_lines(result.output)) == 1


def test_detect_resolves_providers_through_the_runtime(tmp_path, monkeypatch):
    import vlmguard.runtime.providers as providers

    seen = []

    def resolve(requested):
        seen.append(requested)
        raise UsageError("stop here")

    monkeypatch.setattr(providers, "resolve_providers", resolve)
    result = CliRunner().invoke(main, ["detect", "default", "x.png", "--providers", "cuda,cpu"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen == ["cuda,cpu"]


def test_an_answer_length_below_one_is_refused():
    for command in (["run", "b", "--prompt", "hi"], ["eval", "b", "--data", "d"]):
        result = CliRunner().invoke(main, [*command, "--max-new-tokens", "-3"])
        assert result.exit_code == 2 and "--max-new-tokens" in result.output
        assert "Invalid value" in _lines(result.output)[-1]


def test_bench_refuses_a_peer_source_that_is_not_there(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path), "--vs-torch", "nosuch"])
    assert result.exit_code == 1 and "nosuch" in result.output
    assert len(_lines(result.output)) == 1 and "not measured" not in result.output


def test_bench_accepts_the_old_new_tokens_spelling():
    result = CliRunner().invoke(main, ["bench", "--new-tokens", "1", "--model-shape", "tiny"])
    assert result.exit_code == 1 and "--max-new-tokens must be at least 2" in result.output


def test_the_bench_table_fits_80_columns_uncut():
    import io

    from rich.console import Console

    from vlmguard.bench_cli import print_bench

    figures = {"p50": 123.45, "p90": 234.56, "p99": 345.67}
    stages = ("preprocess", "tokenize", "detector", "vision_encoder", "prefill", "decode")
    run = {"stages": dict.fromkeys(stages, figures), "ttft": figures, "end_to_end": figures}
    run["decode_tokens_per_s"] = 12.3
    names = [*stages, "ttft", "end_to_end"]
    record = {
        "bundle": "b", "guarded": run, "neutral": run, "baseline": run,
        "guard_ratio": dict.fromkeys([*names, "decode_time_per_token"], 1.012),
        "guarded_over_baseline": dict.fromkeys(names, 1.05),
        "roofline": {"fraction": None}, "peers": {},
        "memory": {"peak_host_mib": 100, "device_mib": None},
    }  # fmt: skip
    out = io.StringIO()
    print_bench(record, Console(file=out, width=80))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for word in ("unguarded", "export", "neutral", "ratio", "vision_encoder", "end_to_end"):
        assert word in text
    assert "1.050" in text and "345.67" in text
