"""The `vlmguard` command line: export bundles and build tiny reference models."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import VlmguardError


class _Group(click.Group):
    """A click group that prints our own errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command, turning user-facing errors into one-line click errors."""
        try:
            return super().invoke(ctx)
        except (VlmguardError, ValueError, FileExistsError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmguard")
def main() -> None:
    """Training-free jailbreak guards for vision-language models, as ONNX bundles."""


def _quiet_transformers() -> None:
    """Check the export extra is installed; silence transformers' bars under our display."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as err:
        raise click.ClickException(
            f"this command needs the export extra ({err.name} is missing): "
            "pip install 'vlmguard[export]'"
        ) from err

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _parse_window(text: str | None) -> tuple[int, int] | None:
    """'7:9' or '7,9' -> (7, 9)."""
    if text is None:
        return None
    parts = text.replace(",", ":").split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(
            "expected START:END layer indices, e.g. 7:9", param_hint="--ptr-window"
        )
    return int(parts[0]), int(parts[1])


@main.command("export")
@click.argument("source")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory to write.",
)
@click.option(
    "--defenses",
    default="oh,ptr,align",
    show_default=True,
    help="Comma-separated in-model guards to bake in (oh, ptr, align), or 'none'.",
)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--ptr-window",
    default=None,
    help="SafePTR layer window START:END (default 7:9, clipped to the model).",
)
@click.option(
    "--oh-layer",
    type=int,
    default=None,
    help="Oh Defense layer (default 8, clipped; calibration picks it).",
)
@click.option("--oh-head", type=int, default=None, help="Oh Defense head (default 2, clipped).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def export_command(
    source: str,
    out: Path,
    defenses: str,
    dtype: str,
    ptr_window: str | None,
    oh_layer: int | None,
    oh_head: int | None,
    force: bool,
) -> None:
    """Export SOURCE (a checkpoint directory or a cached model id) to a guarded ONNX bundle."""
    from rich.console import Console

    from .export.exporter import export_bundle
    from .export.guard_settings import parse_defenses

    chosen = parse_defenses(defenses)
    window = _parse_window(ptr_window)
    console = Console(stderr=True)
    _quiet_transformers()
    start = time.perf_counter()
    with console.status("starting") as status:

        def step(text: str) -> None:
            console.print(f"[dim]{time.perf_counter() - start:6.1f}s[/dim] {text}")
            status.update(text)

        bundle = export_bundle(
            source,
            out,
            chosen,
            dtype,
            ptr_window=window,
            oh_layer=oh_layer,
            oh_head=oh_head,
            force=force,
            on_step=step,
        )
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    click.echo(f"wrote {bundle} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")


@main.command("tiny-model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--vision", type=click.Choice(["clip", "siglip"]), default="clip", show_default=True)
@click.option(
    "--text", type=click.Choice(["llama", "mistral", "qwen2"]), default="llama", show_default=True
)
@click.option(
    "--shape",
    type=click.Choice(["tiny", "small"]),
    default="tiny",
    show_default=True,
    help="tiny: seconds to export; small: SmolVLM-256M-shaped (siglip + llama only).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into a non-empty directory.")
def tiny_model_command(
    out: Path, vision: str, text: str, shape: str, seed: int, force: bool
) -> None:
    """Write a random-weight LLaVA checkpoint to OUT (for demos, tests and benchmarks)."""
    _quiet_transformers()
    from .export.tiny_model import build_tiny_llava

    path = build_tiny_llava(out, vision=vision, text=text, seed=seed, shape=shape, force=force)
    click.echo(f"wrote {path} ({vision} + {text}, {shape}, seed {seed})")


if __name__ == "__main__":
    sys.exit(main())
