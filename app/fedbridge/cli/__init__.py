"""The ``fedbridge`` command: a typer app whose command groups import heavy libraries lazily,

so every role's install (``fedbridge[edge]`` on the bedside) runs the commands it has.
"""

from __future__ import annotations

import re
import sys

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from fedbridge.cli import data, demo, deploy, edge, explain, federate, stages
from fedbridge.cli.aliases import rewrite
from fedbridge.cli.extras import missing_extra_message
from fedbridge.cli.options import ascii_safe_streams, shown
from fedbridge.cli.quiet import quiet_third_party
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.files import stop_signals_raise

app = typer.Typer(
    name="fedbridge",
    help="Federated bridge transfer learning for small medical image datasets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data")
app.add_typer(federate.app, name="federate")
app.add_typer(deploy.server_app, name="server")
app.add_typer(deploy.site_app, name="site")
stages.register(app)
demo.register(app)
edge.register(app)
explain.register(app)

_state = {"debug": False}
# typer ≤ 0.2x runs on click, newer typer on its own copy of it (the bedside install has only
# that): take the exceptions from whichever typer runs on.
_CLICK = getattr(typer.core, "click", None) or typer.core._click


def _print_version(value: bool) -> None:
    if value:
        from fedbridge_shared import __version__

        print(f"fedbridge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        is_eager=True,
        callback=_print_version,
    ),  # fmt: skip
) -> None:
    """Build accurate medical image classifiers from small datasets without pooling patient data."""
    _state["debug"] = debug


def entry() -> None:
    """The console script: under a locale whose file-name encoding is not UTF-8 (``LC_ALL=C``
    with ``PYTHONUTF8=0``) run again in Python's UTF-8 mode, so valid UTF-8 file names are
    read as such (never called invalid) and written back unchanged; then :func:`main`."""
    import os

    if not sys.flags.utf8_mode and sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
        os.execv(sys.executable, [sys.executable, "-X", "utf8", "-m", "fedbridge", *sys.argv[1:]])
    main()


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and exit code 2."""
    ascii_safe_streams()
    stop_signals_raise()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    quiet_third_party()
    sys.argv[1:] = rewrite(sys.argv[1:], note=lambda text: err.print(f"[yellow]note:[/] {text}"))
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except _CLICK.exceptions.UsageError as e:  # a bad value or command: one line, no box
        if _state["debug"]:
            raise
        message = _once(e.format_message())
        if message:  # empty: a group called without a command, its help already shown
            hint = e.ctx.command_path if e.ctx is not None else "fedbridge"
            err.print(f"[bold red]error:[/] {shown(message)} (see `{shown(hint)} --help`)")
        sys.exit(2)
    except typer.Abort:
        err.print("interrupted")
        sys.exit(130)
    except FedbridgeError as e:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {shown(e)}")
        sys.exit(2)
    except ModuleNotFoundError as e:
        line = missing_extra_message(e.name, sys.argv[1:])
        if line is None or _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {escape(line)}")
        sys.exit(2)
    except OSError as e:
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        err.print(f"[bold red]error:[/] {shown(where + str(e.strerror or e))}")
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def _once(message: str) -> str:
    """click and typer both add "Did you mean …?": keep each sentence once."""
    seen: list[str] = []
    for sentence in re.split(r"(?<=[.?!])\s+", message):
        if sentence.strip() and sentence.strip() not in seen:
            seen.append(sentence.strip())
    return " ".join(seen)
