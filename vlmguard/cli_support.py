"""Pieces every vlmguard command line shares: comma-separated choices and `--providers`.

Torch-free (click only), so every command's `--help` works on a runtime-only install.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

PROVIDERS_HELP = (
    "Comma-separated ONNX Runtime providers in priority order, short (tensorrt, cuda, cpu) or "
    "full names (default: the best available)."
)


class CommaChoice(click.ParamType):
    """A comma-separated list drawn from a closed set (case-insensitive), e.g. 'oh,ptr'.

    `none` names the empty list; with `none_alone` it may not be combined with other items.
    A bad item is a one-line error (exit 1), like the commands' other input errors.
    """

    name = "list"

    def __init__(self, choices: Sequence[str], what: str, none_alone: bool = True) -> None:
        self.choices = tuple(choices)
        self.what = what
        self.none_alone = none_alone

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """The choices, as the help shows them: [a,b,c|none]."""
        items = [c for c in self.choices if c != "none"]
        return f"[{','.join(items)}|none]" if "none" in self.choices else f"[{','.join(items)}]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        """Check every item; return the text unchanged (the command's parser reads it)."""
        text = str(value)
        items = [part.strip().lower() for part in text.split(",") if part.strip()]
        allowed = {c.lower() for c in self.choices}
        unknown = [item for item in items if item not in allowed]
        hint = f"--{param.name.replace('_', '-')}" if param is not None and param.name else "value"
        if unknown:
            raise click.ClickException(
                f"{hint}: unknown {self.what}(s) {', '.join(unknown)}; choose from "
                f"{', '.join(self.choices)}"
            )
        if self.none_alone and "none" in items and len(items) > 1:
            raise click.ClickException(f"{hint}: 'none' cannot be combined with other {self.what}s")
        return text


def providers_option(command: F) -> F:
    """The `--providers` option of every command that runs ONNX graphs."""
    return click.option("--providers", default=None, metavar="LIST", help=PROVIDERS_HELP)(command)
