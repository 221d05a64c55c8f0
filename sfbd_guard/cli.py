"""The `guard` command line: parse, call the library, print. Heavy libraries load inside commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from typer import Abort
from typer._click.exceptions import ClickException, UsageError  # typer 0.29 vendors click

from .errors import GuardError

app = typer.Typer(
    name="guard",
    help="Train diffusion models on data with protected content without the model seeing it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _root() -> None:
    """Curation (prepare), training and audit of diffusion models on protected data, with a compliance ledger."""

LedgerOpt = Annotated[
    Path | None,
    typer.Option("--ledger", help="Ledger directory for the compliance event (default: $GUARD_LEDGER or ./guard-ledger).",
                 show_default=False),
]


def _fail(message: str, hint: str | None, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def reports_errors(command: F) -> F:
    """Turn a GuardError (or an OS error) into one line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GuardError as err:
            _fail(str(err), err.hint, err.exit_code)
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            _fail(f"{err.strerror or err}{where}", None, 1)

    return wrapper  # type: ignore[return-value]


def _invocation(ctx: typer.Context) -> list[str]:
    """The command line as typed (passed down by `main`), for the ledger."""
    argv = (ctx.obj or {}).get("argv")
    return ["guard", *argv] if argv is not None else ctx.command_path.split()


def _progress_bar(description: str) -> Callable[[int], Callable[[int], None]]:
    def start(total: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
                   disable=None)  # None: shown on a terminal only

        def tick(done: int) -> None:
            bar.update(done)
            if bar.n >= total:
                bar.close()

        return tick

    return start


@app.command()
@reports_errors
def prepare(
    ctx: typer.Context,
    policy: Annotated[Path, typer.Option("--policy", help="Policy YAML: dataset, rules, noise and output.")],
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Dataset root; overrides dataset.root of the policy.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Prepared directory to write; overrides output of the policy.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Decoding processes; the output is identical for any count.")] = 1,
    strict: Annotated[bool, typer.Option("--strict", help="Stop with exit 1 at the first unreadable image instead of recording an error row.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output once the new one is complete.")] = False,
    ledger: LedgerOpt = None,
) -> None:
    """Split a dataset into licensed-clean and noised-protected partitions, as a policy says.

    Example: guard prepare --policy policies/digits.yaml --workers 2
    """
    from .curation.report import print_summary
    from .curation.service import prepare_recorded

    result = prepare_recorded(policy, data_root=data_root, out=out, workers=workers, strict=strict,
                              overwrite=overwrite, ledger=ledger, command=_invocation(ctx),
                              progress=_progress_bar("decoding"))
    print_summary(result)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one line and exit 2, never a box or a traceback."""
    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=argv, prog_name="guard", standalone_mode=False, obj={"argv": argv})
    except UsageError as err:
        name = err.ctx.command_path if err.ctx else "guard"
        typer.echo(f"error: {err.format_message()}", err=True)
        typer.echo(f"hint: see '{name} --help'", err=True)
        sys.exit(2)
    except ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
