"""CI check of a runtime-only install: every --help works, offline commands name their extra.

Run with the interpreter of a fresh venv holding `pip install .` alone (no extras): torch,
transformers, onnx and onnxscript must be absent there. Exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

EXPORT_LINE = (
    "Error: this command needs the export extra ({} is missing): pip install 'vlmguard[export]'"
)
PLOT_LINE = (
    "Error: this command needs the plot extra (matplotlib is missing): pip install 'vlmguard[plot]'"
)
HEAVY = ("torch", "transformers", "onnx", "onnxscript", "matplotlib")


def vlmguard(*args: str) -> subprocess.CompletedProcess:
    """Run the installed `vlmguard` entry point of this interpreter's venv."""
    exe = Path(sys.executable).with_name("vlmguard")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand of `vlmguard`, as argument lists."""
    import click

    from vlmguard.cli import main

    def walk(group: click.Group, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, command in group.commands.items():
            found.append((*prefix, name))
            if isinstance(command, click.Group):
                found += walk(command, (*prefix, name))
        return found

    return walk(main, ())


def main() -> int:
    """Check the install; print one line per check."""
    present = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
    if present:
        print(f"FAIL: the runtime-only venv has {', '.join(present)} installed")
        return 1
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vlmguard.runtime.guarded_vlm, vlmguard.cli\n"
         "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
         "assert not bad, bad"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(),  # not the source tree
    )  # fmt: skip
    if done.returncode != 0:
        print(f"FAIL: importing the runtime pulled in torch or transformers: {done.stderr}")
        return 1
    print("ok   import vlmguard.runtime leaves torch and transformers out")
    for path in [(), *command_paths()]:
        done = vlmguard(*path, "--help")
        if done.returncode != 0 or not done.stdout.startswith("Usage:"):
            print(f"FAIL: {' '.join(('vlmguard', *path))} --help: {done.stderr.strip()[-400:]}")
            return 1
        print(f"ok   {' '.join(('vlmguard', *path))} --help")
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        Image.new("RGB", (64, 64), "white").save(f"{tmp}/white.png")
        done = vlmguard("detect", "default", f"{tmp}/white.png", "--providers", "cpu")
        if done.returncode != 0:
            print(f"FAIL: vlmguard detect (a runtime command) failed: {done.stderr[-400:]}")
            return 1
        print(f"ok   vlmguard detect default white.png: {done.stdout.strip()[:60]}")
        offline = [
            (["bench", f"{tmp}/b", "--plot", f"{tmp}/p.png"], PLOT_LINE),
            ["export", "x", "--out", f"{tmp}/b"],
            ["export", "x", "--out", f"{tmp}/b", "--detector", "default"],
            ["tiny-model", f"{tmp}/m"],
            ["calibrate", "x", "--data", f"{tmp}/d.jsonl", "--out", f"{tmp}/p.json"],
            ["detector", "export", "x", "--out", f"{tmp}/d"],
            ["bench", "--model-shape", "tiny"],
            ["bench", f"{tmp}/b", "--vs-torch", "auto"],
            ["demo", "--workdir", f"{tmp}/demo"],
        ]
        for case in offline:
            args, want = case if isinstance(case, tuple) else (case, EXPORT_LINE.format("torch"))
            done = vlmguard(*args)
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            if done.returncode != 1 or lines != [want]:
                print(f"FAIL: vlmguard {' '.join(args)} exited {done.returncode}: {lines[-5:]}")
                return 1
            print(f"ok   vlmguard {' '.join(args)}: {lines[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
