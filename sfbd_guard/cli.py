"""The `guard` command line: parse, call the library, print. Heavy libraries load inside commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, cast

import typer
from typer import Abort
from typer._click.exceptions import NoArgsIsHelpError  # `guard` alone: the help was printed
from typer.exceptions import TyperException  # base of typer's usage and parameter errors

from . import api
from .errors import GuardError, InputError
from .exitcodes import ExitCode, exit_code_lines
from .ledger import ledger_dir, record_failure
from .locations import project_of
from .progress import terminal_progress
from .rundir import MEMBERSHIP_PAGE, SNAPSHOTS
from .threads import choose_threads, configure
from .version import __version__

app = typer.Typer(
    name="guard",
    help="Train diffusion models on data with protected content without the model seeing it.",
    # \b: click prints the lines as they are, without rewrapping (typer's rich help keeps lines anyway)
    epilog="\b\n" + "\n".join(["Exit codes (every command; docs/cli.md):", *exit_code_lines()]),
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options with fixed choices (typer lists them in --help and refuses anything else). engine/methods.py `Method`
# is the source of the method names (tests/test_cli.py checks they agree); --device also takes cuda:N.
MethodChoice = Literal["clean-only", "noisy-direct", "ambient", "sfbd", "online-sfbd"]
DEVICES = "auto|cpu|cuda|cuda:N"

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:

        typer.echo(f"sfbd_guard {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("-V", "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Curation (prepare), training and audit of diffusion models on protected data, with a compliance ledger."""

ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, show_default=False,
                 help="CPU threads per process for torch (default: the CPUs this process may use, over the torchrun "
                      "ranks on this host; OMP_NUM_THREADS if set)."),
]

ExecutorChoice = Literal["local", "ray"]
ExecutorOpt = Annotated[
    ExecutorChoice,
    typer.Option("--executor", help="local (this machine's processes) or ray (Ray tasks and actors: pip install 'sfbd_guard\\[ray]'); the output is the same."),
]

RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", show_default=False,
                 help="With --executor ray: auto or HOST:PORT (join a running cluster), ray://HOST:PORT (Ray client); default: start a Ray on this machine's CPUs (--workers of them for prepare, if given)."),
]

LedgerOpt = Annotated[
    Path | None,
    typer.Option("--ledger", help="Ledger directory for the compliance event (default: $GUARD_LEDGER or ./guard-ledger).",
                 show_default=False),
]


SignKeyOpt = Annotated[
    Path | None,
    typer.Option("--sign-key", help="Ed25519 private key (guard signkey create): sign the ledger head this command appends; the event names the key.",
                 show_default=False),
]

TrackerOpt = Annotated[
    Literal["none", "tensorboard", "mlflow"] | None,
    typer.Option("--tracker", show_default=False,
                 help="Also log the training to TensorBoard (<run>/tensorboard) or MLflow (<run>/mlruns, or mlflow.uri): overrides tracker of the pipeline (pip install 'sfbd_guard\\[trackers]')."),
]


def _fail(message: str, hint: str | None, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def _record_failure(kind: str | None, kwargs: dict[str, Any], err: BaseException) -> None:
    """The `failed` event of an error the library call did not record (one in parsing the options); once per error."""

    ctx = kwargs.get("ctx")
    if kind is None or getattr(ctx, "command_path", None) is None:  # typer's context (a click context)
        return
    record_failure(ledger_dir(kwargs.get("ledger")), kind, _invocation(cast("typer.Context", ctx)), err)


def reports_errors(kind: str | None = None) -> Callable[[F], F]:
    """Turn a GuardError (or an OS error) into one line on stderr and the error's exit code.

    A command that appends a ledger event of `kind` leaves a `failed` event (`interrupted` for Ctrl-C) for every
    error, also one raised before its work started; an unexpected error (a bug) still propagates as is.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except (typer.Exit, Abort):
                raise
            except GuardError as err:
                _record_failure(kind, kwargs, err)
                _fail(str(err), err.hint, err.exit_code)
            except FileNotFoundError as err:  # a file named on the command line or in a config: bad input
                _record_failure(kind, kwargs, err)
                what = f"{err.filename}: missing (no such file or directory)" if err.filename else str(err.strerror or err)
                _fail(what, None, ExitCode.BAD_INPUT)
            except OSError as err:
                _record_failure(kind, kwargs, err)
                where = f": {err.filename}" if err.filename else ""
                _fail(f"{err.strerror or err}{where}", None, ExitCode.CHECK_FAILED)
            except BaseException as err:
                _record_failure(kind, kwargs, err)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


PathT = TypeVar("PathT", Path, Path | None)


def _renamed(ctx: typer.Context, out: PathT, old: Path | None, old_name: str) -> PathT | Path:
    """The value of --out, or of its old name (a hidden alias kept for one release); both typed is an error."""
    if old is None:
        return out
    source = ctx.get_parameter_source("out")
    if source is not None and source.name == "COMMANDLINE":
        raise InputError(f"--out and {old_name} name the same output ({old_name} is its old name): give --out only")
    return old


def _threads(explicit: int | None, preferred: int | None = None) -> None:
    """Passive OpenMP waiting and a thread count sized to this process's CPUs, before torch loads."""

    configure(explicit, preferred)


def _invocation(ctx: typer.Context) -> list[str]:
    """The command line as typed (passed down by `main`), for the ledger."""
    argv = (ctx.obj or {}).get("argv")
    return ["guard", *argv] if argv is not None else ctx.command_path.split()


@app.command()
@reports_errors("prepare")
def prepare(
    ctx: typer.Context,
    policy: Annotated[Path, typer.Option("--policy", help="Policy YAML: dataset, rules, noise and output.")],
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Dataset root; overrides dataset.root of the policy.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Prepared directory to write; overrides output of the policy.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Decoding processes; the output is identical for any count.")] = 1,
    sets: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE", help="Override any policy key, e.g. --set noise.sigma=0.8 (repeatable; the value is read as YAML); recorded in the card and the ledger.")] = [],  # noqa: B006
    strict: Annotated[bool, typer.Option("--strict", help="Stop with exit 1 at the first unreadable image instead of recording an error row.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output once the new one is complete.")] = False,
    noise_key: Annotated[Path | None, typer.Option("--noise-key", help="Secret key file from guard keygen; default your owner key ($GUARD_KEY_FILE, else $XDG_CONFIG_HOME/sfbd_guard/owner.key, created on first use).", show_default=False)] = None,
    ephemeral_key: Annotated[bool, typer.Option("--ephemeral-key", help="Key the noise with a throw-away secret that is never stored (no one can regenerate it, and each such prepare is a new release).")] = False,
    allow_rerelease: Annotated[bool, typer.Option("--allow-rerelease", help="Release protected images already released with other noise (another key, sigma or record id): their copies can then be averaged; recorded in the card and the ledger.")] = False,
    sign_key: Annotated[Path | None, typer.Option("--sign-key", help="Ed25519 private key (guard signkey create): sign card.json into card.sig for those you hand the directory to.")] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Split a dataset into licensed-clean and noised-protected partitions, as a policy says.

    Example: guard prepare --policy policies/digits.yaml --workers 2 --set noise.sigma=0.8
    """
    from .curation.console import print_summary

    overrides = _parse_sets(sets, "noise.sigma=0.8")
    print_summary(api.prepare(policy, data_root=data_root, out=out, workers=workers, strict=strict, overwrite=overwrite,
                              overrides=overrides,
                              noise_key=noise_key, ephemeral_key=ephemeral_key, allow_rerelease=allow_rerelease,
                              sign_key=sign_key, executor=executor, ray_address=ray_address, ledger=ledger,
                              progress=terminal_progress, command=_invocation(ctx)))


@app.command()
@reports_errors()
def keygen(
    file: Annotated[Path, typer.Argument(help="Key file to create (mode 0600; never overwritten).")],
) -> None:
    """Create a secret noise key for `guard prepare --noise-key` (only the data owner keeps it).

    guard prepare creates and reuses the owner's key by itself ($GUARD_KEY_FILE, else
    $XDG_CONFIG_HOME/sfbd_guard/owner.key); a key file made here is for a prepare that wants another one.
    Anyone who holds the key and a prepared directory made with it can rebuild the protected originals:
    keep it away from the prepared directory, the training team and backups they can read.

    Example: guard keygen ~/.config/sfbd_guard/celeba.key
    """
    from .keys.secret import create_key_file

    key = create_key_file(file)
    typer.echo(f"noise key: {file} (mode 0600, key id {key.key_id[:16]})")


key_app = typer.Typer(help="The data owner's key: export what a verifier needs.\n\n"
                           "Example: guard key export-digest verifier-digest.key", no_args_is_help=True)
app.add_typer(key_app, name="key")


@key_app.command("export-digest")
@reports_errors()
def key_export_digest(
    file: Annotated[Path, typer.Argument(help="Digest key file to create (mode 0600; never overwritten).")],
    noise_key: Annotated[Path | None, typer.Option("--noise-key", help="The key file the directories were prepared with; default your owner key.", show_default=False)] = None,
) -> None:
    """Write the digest subkey for a verifier (guard verify --digest-key): it checks that no clean row of a prepared
    directory is a protected or excluded image; it cannot regenerate any noise nor derive the owner's key.

    Example: guard key export-digest verifier-digest.key
    """
    from .keys.secret import export_digest_key, owner_key, read_key_file

    key = read_key_file(noise_key) if noise_key is not None else owner_key(create=False).key
    export_digest_key(key, file)
    typer.echo(f"digest key: {file} (mode 0600, of the key {key.key_id[:16]}): it lets a verifier check the pixel "
               "digests of directories prepared with that key, and regenerates no noise")


def _parse_sets(values: list[str], example: str = "optimizer.lr=2e-4") -> dict[str, Any]:
    """`--set a.b=value` pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    from .config import parse_scalar

    pairs = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {example}")
        pairs[key.strip()] = parse_scalar(raw)
    return pairs


@app.command()
@reports_errors("train")
def train(
    ctx: typer.Context,
    pipeline: Annotated[Path | None, typer.Option("--pipeline", help="Pipeline YAML: data, method, model, optimizer, schedule.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Prepared directory to train on; overrides data of the pipeline (with --resume: of a moved run, same fingerprint).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to create; default runs/<pipeline name>.")] = None,
    method: Annotated[MethodChoice | None, typer.Option("--method", help="Training method; overrides method of the pipeline.")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar=DEVICES, help="Device; overrides device of the pipeline.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the run; overrides seed of the pipeline.")] = None,
    sets: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE", help="Override any pipeline key, e.g. --set schedule.pretrain_kimg=50 (repeatable).")] = [],  # noqa: B006
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its last checkpoint.")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this run's EMA weights (its latest checkpoint; init.checkpoint names another); recorded as the new run's lineage.")] = None,
    dp_epsilon: Annotated[float | None, typer.Option("--dp-epsilon", help="Train the stages that read protected data with DP-SGD to this epsilon (privacy.epsilon).")] = None,
    dp_delta: Annotated[float | None, typer.Option("--dp-delta", help="Delta of the DP guarantee; default 1/(10 × protected records) (privacy.delta).")] = None,
    dp_max_grad_norm: Annotated[float | None, typer.Option("--dp-max-grad-norm", help="Per-sample gradient clipping norm (privacy.max_grad_norm).")] = None,
    dp_accountant: Annotated[Literal["rdp", "prv"] | None, typer.Option("--dp-accountant", help="Privacy accountant (privacy.accountant).")] = None,
    dp_stages: Annotated[str | None, typer.Option("--dp-stages", metavar="STAGE,...", help="Comma-separated private stages: pretrain, rounds, online, train (privacy.stages).")] = None,
    dp_physical_batch: Annotated[int | None, typer.Option("--dp-physical-batch", help="Samples per forward/backward in a DP step (privacy.physical_batch).")] = None,
    dp_lr: Annotated[float | None, typer.Option("--dp-lr", help="Learning rate of the private steps; default optimizer.lr (privacy.lr).")] = None,
    verify_key: Annotated[Path | None, typer.Option("--verify-key", help="Data owner's Ed25519 public key: the prepared directory's card.sig must verify with it (verify_key).")] = None,
    allow_unrecorded: Annotated[bool, typer.Option("--allow-unrecorded", help="Train on a prepared directory that no prepare event of this ledger wrote and no signature vouches for (recorded; guard verify fails it).")] = False,
    tracker: TrackerOpt = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Train a diffusion model on a prepared directory (never on a raw dataset).

    Example: guard train --pipeline pipelines/digits.yaml --out runs/digits
    """
    dp = {f"privacy.{key}": value for key, value in (
        ("epsilon", dp_epsilon), ("delta", dp_delta), ("max_grad_norm", dp_max_grad_norm), ("accountant", dp_accountant),
        ("stages", dp_stages.split(",") if dp_stages else None), ("physical_batch", dp_physical_batch), ("lr", dp_lr)) if value is not None}
    overrides = _parse_sets(sets)
    overrides.update({k: v for k, v in (("device", device), ("seed", seed), ("tracker", tracker)) if v is not None})
    overrides.update(dp)
    if init is not None:
        overrides["init.run"] = str(init.resolve())
    config = api.training_config(pipeline, resume=resume, data=data, out=out, method=method, overrides=overrides,
                                 verify_key=verify_key, ledger=ledger)
    _threads(threads, config.threads)  # before torch is imported (training imports it)
    outcome = api.train(config, resume=resume, allow_unrecorded=allow_unrecorded, sign_key=sign_key, ledger=ledger,
                        progress=terminal_progress, command=_invocation(ctx))
    if outcome.checkpoint is not None:
        typer.echo(f"trained {config.method} for {outcome.kimg:g} kimg ({outcome.step} steps, {outcome.seconds:.0f} s)")
        typer.echo(f"run: {outcome.run_dir}")
        typer.echo(f"checkpoint: {outcome.checkpoint}")
        typer.echo(f"snapshots: {outcome.run_dir / SNAPSHOTS}")
        if outcome.privacy:
            p = outcome.privacy
            typer.echo(f"privacy: epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} ({p['accountant']}), noise multiplier "
                       f"{p['noise_multiplier']:.3g}, sample rate {p['sample_rate']:.3g}, {p['steps']} private steps")


@app.command()
@reports_errors("sample")
def sample(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="Run directory written by guard train.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images to draw.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG files and grid.png.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Weights (.safetensors or checkpoint folder); default the run's latest EMA.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampler steps (EDM Heun; 2 × steps - 1 network evaluations).")] = 18,
    seed: Annotated[int, typer.Option("--seed", help="Seed; image i depends only on (seed, i).")] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per sampling batch.")] = 64,
    device: Annotated[str, typer.Option("--device", metavar=DEVICES, help="Device for sampling.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that holds images (without it, refused): same names are replaced, and the images a previous guard sample listed there but this one does not write are removed.")] = False,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Draw images from a trained run: one PNG per image plus grid.png.

    Example: guard sample --run runs/digits --n 64 --out samples/digits
    """
    _threads(threads)
    outcome = api.sample(run, n=n, out=out, checkpoint=checkpoint, steps=steps, seed=seed, batch=batch, device=device,
                         overwrite=overwrite, sign_key=sign_key, ledger=ledger, progress=terminal_progress,
                         command=_invocation(ctx))
    typer.echo(f"wrote {len(outcome.files)} images to {outcome.out} ({outcome.seconds:.1f} s)")
    typer.echo(f"grid: {outcome.grid}")


@app.command()
@reports_errors("audit")
def audit(
    ctx: typer.Context,
    samples: Annotated[Path, typer.Option("--samples", help="Folder of generated PNG/JPEG images to audit (recursive, any size).")],
    data: Annotated[Path, typer.Option("--data", help="Prepared directory whose manifest names the protected records.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for samples.parquet, summary.json and report.html.")] = Path("audit-report"),
    old_report: Annotated[Path | None, typer.Option("--report", hidden=True, help="guard audit's old name of --out (kept for one release).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Audit settings YAML (e.g. audits/default.yaml); options below override it.")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Where the source dataset with the protected originals lives; default the root recorded by guard prepare.")] = None,
    holdout: Annotated[Path | None, typer.Option("--holdout", help="Folder of real images never trained on, to calibrate thresholds; default the dataset's other splits.")] = None,
    embedder: Annotated[Literal["auto", "pixel", "clip"] | None, typer.Option("--embedder", help="Embedder (auto: clip when CLIP weights are configured, else pixel).")] = None,
    clip_model: Annotated[str | None, typer.Option("--clip-model", help="open_clip architecture of a CLIP weights file, e.g. ViT-B-32.")] = None,
    clip_weights: Annotated[Path | None, typer.Option("--clip-weights", help="Local CLIP weights: a .safetensors/.bin/.pt file, or an open_clip directory. Never downloaded.")] = None,
    alpha_copy: Annotated[float | None, typer.Option("--alpha-copy", help="Target false-positive rate of the copy verdict on unseen real images (default 0.001).")] = None,
    alpha_suspect: Annotated[float | None, typer.Option("--alpha-suspect", help="Target false-positive rate of the suspect verdict (default 0.01).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Nearest protected neighbours listed per sample (default 10).")] = None,
    index_cache: Annotated[Path | None, typer.Option("--index-cache", "--index-cache-dir", help="Turn the reference index cache on, in this owner-only directory. Off by default: for the pixel embedder it holds an exact copy of the protected originals at <= 32 px. (cache.enabled: true in --config uses $GUARD_AUDIT_CACHE or ~/.cache/sfbd_guard/audit-index.)")] = None,
    no_index_cache: Annotated[bool, typer.Option("--no-index-cache", help="Do not read or write the reference index cache, whatever --config or --index-cache say.")] = False,
    no_thumbnails: Annotated[bool, typer.Option("--no-thumbnails", help="Show no protected original in report.html, not even for flagged matches.")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Find generated images that copy protected originals; exit 3 if any sample is a copy.

    Example: guard audit --samples runs/celeba/samples --data prepared/celeba-64 --out runs/celeba/audit
    """
    report = _renamed(ctx, out, old_report, "--report")
    _threads(threads)
    from .auditing.results import print_summary

    result = api.audit(samples, data, report=report, config=config, overrides={
        "embedder.kind": embedder, "embedder.clip_model": clip_model,
        "embedder.clip_weights": str(clip_weights.resolve()) if clip_weights else None,
        "calibration.alpha_copy": alpha_copy, "calibration.alpha_suspect": alpha_suspect, "search.k": k,
        "cache.dir": str(index_cache.resolve()) if index_cache else None,
        "cache.enabled": False if no_index_cache else (True if index_cache else None),
        "report.thumbnails": False if no_thumbnails else None,
    }, data_root=data_root, holdout=holdout, executor=executor, ray_address=ray_address, sign_key=sign_key, ledger=ledger,
        progress=terminal_progress, command=_invocation(ctx))
    print_summary(result.summary, report)
    if result.counts["copy"]:
        raise typer.Exit(ExitCode.COPIES_FOUND)


@app.command("import-weights")
@reports_errors("import")
def import_weights(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The weights: a .safetensors file (no pickle is ever read).")],
    licence: Annotated[str, typer.Option("--licence", help="Their licence, as an SPDX expression (e.g. CC-BY-4.0): recorded as declared.")],
    source: Annotated[str, typer.Option("--source", help="Where they come from (a URL, a paper, a team): recorded as declared.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create, to start runs from (guard train --init FOLDER).")],
    ledger: LedgerOpt = None,
) -> None:
    """Bring in weights trained elsewhere as the root of a lineage (declared, not verified).

    Example: guard import-weights unet.safetensors --licence CC-BY-4.0 --source "https://example.org/model" --out imports/base
    """
    folder = api.import_weights(file, out=out, licence=licence, source=source, ledger=ledger, command=_invocation(ctx))
    typer.echo(f"imported {file} into {folder} (licence {licence}, as declared); start a run from it with "
               f"guard train --init {folder}")


@app.command()
@reports_errors("export")
def export(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="The run whose model (its latest EMA weights, as the ledger recorded them) is exported.")],
    out: Annotated[Path, typer.Option("--out", help="New folder: the model in diffusers' layout (network diffusers-unet2d) or ours, its model card, LICENSE and export.json.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint folder or ema.safetensors of the run whose weights a training ended with; default the latest.")] = None,
    licence: Annotated[str | None, typer.Option("--licence", help="The model's licence (SPDX, e.g. CC-BY-4.0); default the training data's one licence, else 'other'.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The run's prepared directory, if it moved.")] = None,
    push: Annotated[str | None, typer.Option("--push", help="Also upload the folder to this Hugging Face model repository (huggingface_hub; private unless --public).")] = None,
    public: Annotated[bool, typer.Option("--public", help="With --push: create the repository public.")] = False,
    ledger: LedgerOpt = None,
) -> None:
    """Write a run's model in a layout other tools load (diffusers, the Hub), with its card and evidence.

    Example: guard export --run runs/digits --out exports/digits [--push me/digits-sfbd]
    """
    record = api.export(run, out=out, checkpoint=checkpoint, licence=licence, data=data, push=push, public=public,
                        ledger=ledger, command=_invocation(ctx))
    typer.echo(f"exported {record.run} ({record.format}, {len(record.files) + 1} files, licence {record.licence}) to {out}")
    if push:
        typer.echo(f"pushed to https://huggingface.co/{push}")


@app.command()
@reports_errors("membership")
def membership(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="The run whose model (its latest EMA weights) is tested.")],
    data: Annotated[Path | None, typer.Option("--data", help="Its prepared directory; default the one the run trained on.")] = None,
    control: Annotated[Path | None, typer.Option("--control", help="A clean-only run of the same prepared data: the same test on a model that never saw the protected copies, so a selection difference is not read as memorisation.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for membership.json, membership.parquet, membership.html and roc.svg (owner-only).")] = Path("membership-report"),
    old_report: Annotated[Path | None, typer.Option("--report", hidden=True, help="guard membership's old name of --out (kept for one release).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Audit settings YAML; its membership section (noise levels, draws, caps, margin).")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Where the source dataset with the originals lives; default the root recorded by guard prepare.")] = None,
    holdout: Annotated[Path | None, typer.Option("--holdout", help="Folder of real images never trained on; default the policy's holdout records, else the dataset's other splits.")] = None,
    max_images: Annotated[int | None, typer.Option("--max-images", help="At most this many images per group (default 512; a seeded subset).")] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Does the model remember what it never saw clean? A membership test of its weights; exit 3 on ATTENTION.

    Example: guard membership --run runs/sfbd --control runs/clean-only --out runs/sfbd-membership
    """
    report = _renamed(ctx, out, old_report, "--report")
    _threads(threads)
    result = api.membership(run, report=report, data=data, control=control, config=config,
                            overrides={"membership.max_images": max_images}, data_root=data_root, holdout=holdout,
                            executor=executor, ray_address=ray_address, sign_key=sign_key, ledger=ledger, progress=terminal_progress, command=_invocation(ctx))
    s = result.summary
    for group in s.groups:
        control_auc = f", control {group.control.auc:.3f}" if group.control else ""
        typer.echo(f"{group.group:>9}: AUC {group.model.auc:.3f} ({group.model.auc_ci95[0]:.3f}–{group.model.auc_ci95[1]:.3f}), "
                   f"TPR@1%FPR {group.model.tpr_at_1pct_fpr:.3f}{control_auc}; {group.images} images vs "
                   f"{group.holdout_images} holdout")
    typer.echo(f"{s.verdict}: {s.verdict_reason}")
    typer.echo(f"report: {result.report / MEMBERSHIP_PAGE}")
    if s.verdict == "ATTENTION":
        raise typer.Exit(ExitCode.COPIES_FOUND)


@app.command()
@reports_errors()
def report(
    ctx: typer.Context,
    sql: Annotated[str | None, typer.Option("--sql", help="Any query over the views events, prepares, trainings, samplings, audits, memberships.")] = None,
    fmt: Annotated[Literal["table", "csv", "json", "parquet", "html"], typer.Option("--format", help="Output format (parquet and html need --out); html: the compliance report, a verdict per run chain, guard verify's checks, events, charts (one file).")] = "table",
    out: Annotated[Path | None, typer.Option("--out", help="Write the result to this file instead of printing it.")] = None,
    old_output: Annotated[Path | None, typer.Option("--output", hidden=True, help="guard report's old name of --out (kept for one release).")] = None,
    old_html: Annotated[Path | None, typer.Option("--html", hidden=True, help="Old spelling of --format html --out FILE (kept for one release); combines with the other options as it did.")] = None,
    datasheet: Annotated[Path | None, typer.Option("--datasheet", help="Write the training-data summary of --run as Markdown to this file.")] = None,
    model_card: Annotated[Path | None, typer.Option("--model-card", help="Write a Hugging Face model card (README.md) of --run into this folder.")] = None,
    dataset_card: Annotated[Path | None, typer.Option("--dataset-card", help="Write a Hugging Face dataset card (README.md) of the prepared directory (--data, or --run's) into this folder.")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="The run that --datasheet and --model-card describe.")] = None,
    digest_key: Annotated[Path | None, typer.Option("--digest-key", help="With --format html: the data owner's digest key (guard key export-digest), for guard verify's pixel checks.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The prepared directory: --run's when run.json's path to it does not resolve, or the one --dataset-card describes.")] = None,
    ledger: LedgerOpt = None,
) -> None:
    """Read the compliance ledger: datasets prepared, training runs, audits; any SQL; HTML; datasheets; cards.

    The options combine: guard report --format html --out report.html --datasheet DATASHEET.md --model-card card --run runs/digits

    Example: guard report --sql "SELECT method, epsilon FROM trainings" --format csv
    """
    from .compliance.tables import emit, report_tables

    where = ledger_dir(ledger)
    output = _renamed(ctx, out, old_output, "--output")
    html = old_html  # --html FILE: the page, and the table (or --sql's result) as before
    if fmt == "html":
        if html is not None:
            raise InputError("--format html --out FILE and --html FILE (its old spelling) name the same page: give one")
        if output is None:
            raise InputError("--format html writes the compliance report to a file: add --out FILE")
        if sql is not None:
            raise InputError("--format html is the report of the whole ledger, not of a query: give --sql with "
                             "--format table, csv, json or parquet")
        html, output = output, None
    if (datasheet is not None or model_card is not None) and run is None:
        raise InputError("--datasheet and --model-card describe a run: add --run DIR")
    if dataset_card is not None and run is None and data is None:
        raise InputError("--dataset-card describes a prepared directory: add --data DIR (or --run DIR)")
    documents = datasheet is not None or model_card is not None or dataset_card is not None
    if fmt != "html" and (not documents or sql is not None or output is not None or fmt != "table"):

        emit(api.report(sql, ledger=where), fmt, output, project_of(where))
    if html is not None:
        from .compliance.html import write_html

        typer.echo(f"html report: {write_html(html, where, report_tables(where, None), digest_key=digest_key)}")
    if datasheet is not None and run is not None:
        from .compliance.datasheet import write_datasheet

        typer.echo(f"datasheet: {write_datasheet(datasheet, run, where, data)}")
    if model_card is not None and run is not None:
        from .compliance.cards import write_model_card

        typer.echo(f"model card: {write_model_card(model_card, run, where, data)}")
    if dataset_card is not None:
        from .compliance.cards import write_dataset_card

        typer.echo(f"dataset card: {write_dataset_card(dataset_card, where, run=run, data=data)}")


@app.command()
@reports_errors()
def verify(
    run: Annotated[Path, typer.Option("--run", help="Run directory to check, written by guard train.")],
    verify_key: Annotated[Path | None, typer.Option("--verify-key", help="Data owner's Ed25519 public key: also check the prepared directory's card.sig.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="The run's prepared directory, when run.json's path to it does not resolve.")] = None,
    digest_key: Annotated[Path | None, typer.Option("--digest-key", help="The data owner's digest key (guard key export-digest): compare the manifest's keyed pixel digests with the clean rows (without it that check needs attention).")] = None,
    ledger_key: Annotated[list[Path] | None, typer.Option("--ledger-key", help="Public key (repeatable) of those who sign the ledger's heads (--sign-key): each signature must be by one of them, and the chain must be anchored by one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON (name, status PASS/ATTENTION/FAIL, detail, evidence paths); same exit codes.")] = False,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="The owner's source dataset (default the root card.json records, when readable): the lineage check then searches ancestors' clean images for near copies of protected originals.")] = None,
    ledger: LedgerOpt = None,
) -> None:
    """Check from files alone that a run saw only what its policy allowed; exit 1 if any check fails.

    On a terminal the checks are a table wrapped to its width; piped, one line per check (STATUS  name: detail).

    Example: guard verify --run runs/digits
    """

    from .compliance.tables import checks_json, print_checks, printable
    checks = api.verify(run, verify_key=verify_key, data=data, digest_key=digest_key, ledger_keys=ledger_key or [],
                        ledger=ledger, data_root=data_root)
    failed = [c.name for c in checks if not c.passed]
    attention = sum(c.passed and c.attention for c in checks)
    if as_json:
        typer.echo(checks_json(run.resolve(), checks))
    else:
        if sys.stdout.isatty():
            print_checks(checks)
        else:
            for check in checks:
                typer.echo(printable(f"{check.word}  {check.name}: {check.detail}"))
        typer.echo(f"{len(checks) - len(failed) - attention} passed, {attention} need attention, {len(failed)} failed")
    if failed:
        raise typer.Exit(ExitCode.CHECK_FAILED)


@app.command("run")
@reports_errors("run")
def run_command(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML naming the policy, the training, the sampling and the audit.")],
    allow_unrecorded: Annotated[bool, typer.Option("--allow-unrecorded", help="Train on a prepared directory that no prepare event of this ledger wrote (recorded; guard verify fails it).")] = False,
    tracker: TrackerOpt = None,
    threads: ThreadsOpt = None,
    sign_key: SignKeyOpt = None,
    ledger: LedgerOpt = None,
) -> None:
    """Prepare, train, sample, audit and report in one command; re-running continues where it stopped.

    Example: guard run pipelines/digits.yaml
    """
    from .engine.config import load_pipeline

    _threads(threads, load_pipeline(pipeline).threads)  # before torch is imported
    summary = api.run(pipeline, allow_unrecorded=allow_unrecorded, sign_key=sign_key, ledger=ledger,
                      progress=terminal_progress, say=typer.echo, command=_invocation(ctx),
                      overrides={"tracker": tracker} if tracker else None)
    for stage, what in summary.stages.items():
        typer.echo(f"{stage:>8}: {what}")
    typer.echo(f"samples grid: {summary.files['grid']}")
    typer.echo(f"audit report: {summary.files['audit']}" + (f"  ({summary.copies} COPIES FOUND)" if summary.copies else ""))
    typer.echo(f"compliance report: {summary.files['report']}")
    typer.echo(f"datasheet: {summary.files['datasheet']}")
    if summary.copies:
        raise typer.Exit(ExitCode.COPIES_FOUND)


signkey_app = typer.Typer(help="Ed25519 keys with which a data owner signs prepared directories.\n\n"
                               "Example: guard signkey create --private owner.key --public owner.pub", no_args_is_help=True)
app.add_typer(signkey_app, name="signkey")


@signkey_app.command("create")
@reports_errors()
def signkey_create(
    private: Annotated[Path, typer.Option("--private", help="Private key file to create (PEM, mode 0600); keep it with the data owner.")],
    public: Annotated[Path, typer.Option("--public", help="Public key file to create (PEM); give it to whoever trains or verifies.")],
) -> None:
    """Create a signing key pair for guard prepare --sign-key and --verify-key.

    Example: guard signkey create --private owner.key --public owner.pub
    """
    from .keys.signing import create_keypair

    fingerprint = create_keypair(private, public)
    typer.echo(f"private key: {private} (mode 0600)")
    typer.echo(f"public key: {public} (sha256 {fingerprint})")


@app.command()
def info(
    threads: ThreadsOpt = None,
) -> None:
    """Show the version and the CPU threads a torch command of this process would use, and why.

    Example: taskset -c 0 guard info
    """

    choice = choose_threads(threads)
    typer.echo(f"sfbd_guard {__version__}")
    typer.echo(f"threads: {choice.describe()}")


def _plain_flags(command: Any) -> None:
    """Flags take no value: show no type for them in help (typer would print `<bool>`)."""
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    make_help_option = command.get_help_option  # --help / -h is made per context, not in params

    def help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one line and exit 2, never a box or a traceback; exit codes as
    exitcodes.py says (Ctrl-C, which typer turns into exit 130, and an abort are both 130)."""
    command = typer.main.get_command(app)
    _plain_flags(command)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=argv, prog_name="guard", standalone_mode=False, obj={"argv": argv})
    except (Abort, KeyboardInterrupt):  # typer turns Ctrl-C in a command into Exit(130) itself
        typer.echo("aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except NoArgsIsHelpError:  # `guard` (or `guard signkey`) alone: typer has printed the help already
        sys.exit(ExitCode.OK)
    except TyperException as err:  # a usage error (exit 2) or another parameter error
        format_message = getattr(err, "format_message", None)
        typer.echo(f"error: {format_message() if format_message else err}", err=True)
        code = int(getattr(err, "exit_code", ExitCode.CHECK_FAILED))
        if code == ExitCode.BAD_INPUT:
            ctx = getattr(err, "ctx", None)
            typer.echo(f"hint: see '{ctx.command_path if ctx else 'guard'} --help'", err=True)
        sys.exit(code)
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
