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
from .errors import InputError as GuardErrorForCli

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


def _parse_sets(values: list[str]) -> dict[str, Any]:
    """`--set a.b=value` pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    from .config import parse_scalar

    pairs = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GuardErrorForCli(f"--set {item!r}: expected KEY=VALUE, e.g. --set optimizer.lr=2e-4")
        pairs[key.strip()] = parse_scalar(raw)
    return pairs


@app.command()
@reports_errors
def train(
    ctx: typer.Context,
    pipeline: Annotated[Path | None, typer.Option("--pipeline", help="Pipeline YAML: data, method, model, optimizer, schedule.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Prepared directory to train on; overrides data of the pipeline.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to create; default runs/<pipeline name>.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Training method; overrides method of the pipeline.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N; overrides device of the pipeline.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the run; overrides seed of the pipeline.")] = None,
    sets: Annotated[list[str], typer.Option("--set", help="Override any pipeline key, e.g. --set schedule.pretrain_kimg=50 (repeatable).")] = [],  # noqa: B006
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its last checkpoint.")] = None,
    dp_epsilon: Annotated[float | None, typer.Option("--dp-epsilon", help="Train the stages that read protected data with DP-SGD to this epsilon (privacy.epsilon).")] = None,
    dp_delta: Annotated[float | None, typer.Option("--dp-delta", help="Delta of the DP guarantee; default 1/(10 × protected records) (privacy.delta).")] = None,
    dp_max_grad_norm: Annotated[float | None, typer.Option("--dp-max-grad-norm", help="Per-sample gradient clipping norm (privacy.max_grad_norm).")] = None,
    dp_accountant: Annotated[str | None, typer.Option("--dp-accountant", help="rdp or prv (privacy.accountant).")] = None,
    dp_stages: Annotated[str | None, typer.Option("--dp-stages", help="Comma-separated private stages: pretrain, rounds, online, train (privacy.stages).")] = None,
    dp_physical_batch: Annotated[int | None, typer.Option("--dp-physical-batch", help="Samples per forward/backward in a DP step (privacy.physical_batch).")] = None,
    ledger: LedgerOpt = None,
) -> None:
    """Train a diffusion model on a prepared directory (never on a raw dataset).

    Example: guard train --pipeline pipelines/digits.yaml --out runs/digits
    """
    from .engine.service import pipeline_for_new_run, pipeline_of_run, train_recorded

    if (pipeline is None) == (resume is None):
        raise GuardErrorForCli("give either --pipeline (a new run) or --resume RUN_DIR (continue one)")
    dp = {f"privacy.{key}": value for key, value in (
        ("epsilon", dp_epsilon), ("delta", dp_delta), ("max_grad_norm", dp_max_grad_norm), ("accountant", dp_accountant),
        ("stages", dp_stages.split(",") if dp_stages else None), ("physical_batch", dp_physical_batch)) if value is not None}
    if resume is not None:
        if data or out or method or device or seed is not None or sets or dp:
            raise GuardErrorForCli("--resume continues a run with its saved config; other options do not apply")
        config = pipeline_of_run(resume)
    else:
        overrides = _parse_sets(sets)
        overrides.update({k: v for k, v in (("device", device), ("seed", seed)) if v is not None})
        overrides.update(dp)
        config = pipeline_for_new_run(pipeline, overrides=overrides, data=data, out=out, method=method)  # type: ignore[arg-type]
    outcome = train_recorded(config, resume=resume is not None, ledger=ledger, command=_invocation(ctx),
                             progress=lambda label, total: _progress_bar(label)(total))
    if outcome.checkpoint is not None:
        typer.echo(f"trained {config.method} for {outcome.kimg:g} kimg ({outcome.step} steps, {outcome.seconds:.0f} s)")
        typer.echo(f"run: {outcome.run_dir}")
        typer.echo(f"checkpoint: {outcome.checkpoint}")
        typer.echo(f"snapshots: {outcome.run_dir / 'snapshots'}")


@app.command()
@reports_errors
def sample(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="Run directory written by guard train.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images to draw.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG files and grid.png.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Weights (.safetensors or checkpoint folder); default the run's latest EMA.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampler steps (EDM Heun; 2 × steps - 1 network evaluations).")] = 18,
    seed: Annotated[int, typer.Option("--seed", help="Seed; image i depends only on (seed, i).")] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per sampling batch.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N for sampling.")] = "auto",
    ledger: LedgerOpt = None,
) -> None:
    """Draw images from a trained run: one PNG per image plus grid.png.

    Example: guard sample --run runs/digits --n 64 --out samples/digits
    """
    from .engine.service import sample_recorded

    outcome = sample_recorded(run, ledger=ledger, command=_invocation(ctx), count=n, out=out, steps=steps, seed=seed,
                              batch=batch, checkpoint=checkpoint, device=device, progress=_progress_bar("sampling"))
    typer.echo(f"wrote {len(outcome.files)} images to {outcome.out} ({outcome.seconds:.1f} s)")
    typer.echo(f"grid: {outcome.grid}")


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
