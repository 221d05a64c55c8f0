"""Pipeline configs (`pipelines/<name>.yaml`): what to train, on which prepared data, and how."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..config import StrictModel, read_yaml_mapping, set_dotted, validate_mapping
from .methods import Method, Stage, stages_of


class ModelSpec(StrictModel):
    model_channels: int = Field(32, gt=0)  # channels of the first U-Net level
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)  # per-level multipliers
    num_blocks: int = Field(2, ge=1)  # residual blocks per resolution
    attn_resolutions: list[int] = Field(default_factory=lambda: [8])  # resolutions with self-attention
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout inside residual blocks
    num_heads: int = Field(1, ge=1)  # attention heads


class OptimizerSpec(StrictModel):
    lr: float = Field(1e-3, gt=0)  # Adam learning rate after warm-up
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)  # Adam betas
    eps: float = Field(1e-8, gt=0)  # Adam epsilon
    warmup_kimg: float = Field(0.0, ge=0)  # linear learning-rate warm-up, thousands of images
    grad_clip: float | None = Field(None, gt=0)  # clip the global gradient norm to this (none: no clipping)


class ScheduleSpec(StrictModel):
    pretrain_kimg: float = Field(100.0, ge=0)  # training on the clean partition (sfbd, online-sfbd); 0 only with init
    rounds: int = Field(0, ge=0)  # sfbd: denoise + fine-tune rounds
    round_kimg: float = Field(0.0, ge=0)  # sfbd: fine-tuning length of each round
    total_kimg: float | None = Field(None, gt=0)  # whole run; default pretrain_kimg + rounds × round_kimg (sfbd)
    refresh_every: int = Field(20, ge=1)  # online-sfbd: optimizer steps between bank refreshes (P2: m = 20)
    refresh_size: int = Field(64, ge=1)  # online-sfbd: records re-denoised per refresh
    ramp_start_kimg: float | None = Field(None, ge=0)  # online-sfbd: denoised weight starts rising (default: pretrain end)
    ramp_end_kimg: float | None = Field(None, ge=0)  # online-sfbd: and reaches 1 (default: a quarter into the online phase)
    # sfbd (other methods ignore it): when the rounds start. kimg: at pretrain_kimg. converged: at the first check,
    # from pretrain_kimg on, at which the validation loss on held-back copies (validation.py) is less than
    # converge_tol below its best value of converge_window_kimg before; the rounds then share the rest of the budget
    # equally, and if pretraining never converges no round runs (the run is clean-only training). Needs the
    # validation measure (not under DP-SGD).
    pretrain_until: Literal["kimg", "converged"] = "kimg"
    check_every_kimg: float | None = Field(None, gt=0)  # converged: kimg between checks (default: budget / 50)
    converge_window_kimg: float | None = Field(None, gt=0)  # converged: the look-back (default: budget / 10)
    converge_tol: float = Field(0.01, ge=0, lt=1)  # converged: relative improvement below which pretraining has

    def converge_window(self) -> tuple[float, float]:
        """(check interval, look-back window) of `pretrain_until: converged`, in kimg."""
        budget = self.budget_kimg()
        every = self.check_every_kimg if self.check_every_kimg is not None else budget / 50
        window = self.converge_window_kimg if self.converge_window_kimg is not None else budget / 10
        return every, window

    def ramp(self) -> tuple[float, float]:
        """(start, end) of online SFBD's linear 0 → 1 ramp of the denoised-loss weight, in kimg."""
        start = self.ramp_start_kimg if self.ramp_start_kimg is not None else self.pretrain_kimg
        total = self.total_kimg if self.total_kimg is not None else self.pretrain_kimg
        end = self.ramp_end_kimg if self.ramp_end_kimg is not None else start + 0.25 * max(0.0, total - start)
        return start, end

    def budget_kimg(self) -> float:
        """The length of the whole run, the same for every method (a fair compute budget)."""
        return self.total_kimg if self.total_kimg is not None else self.pretrain_kimg + self.rounds * self.round_kimg


class DenoiseSpec(StrictModel):
    steps: int = Field(18, ge=2)  # EDM grid size whose truncation at the record's sigma is integrated
    # heun / euler: PF-ODE solvers of the backward step; mean: the posterior mean D(y; σ); sde: a posterior sample by
    # the reverse SDE (ancestral steps on the same grid, one network evaluation each)
    solver: Literal["heun", "euler", "mean", "sde"] = "heun"
    grid: Literal["edm", "fitted"] = "edm"  # edm: the EDM grid cut at sigma; fitted: `steps` points on [sigma_min, sigma]
    rho: float = Field(7.0, gt=0)  # grid spacing exponent (EDM: 7)
    sigma_min: float = Field(0.002, gt=0)  # smallest non-zero grid point
    batch: int = Field(256, ge=1)  # images per denoising batch (per process)


class SFBDSpec(StrictModel):
    clean_weight: float | None = Field(None, gt=0, lt=1)  # share of clean images per batch; null: natural proportion
    transfer_ema: bool = True  # each round starts from the EMA weights with a fresh optimizer (reference code)
    # the denoised images' noise floor in the loss (the ambient loss above it, as for noisy copies): 0 / null trains on
    # them as clean; auto: the RMS error of the round set that the validation measure estimates (validation.py)
    denoised_floor: Annotated[float, Field(ge=0)] | Literal["auto"] | None = None
    quantize: bool = True  # denoised images kept as uint8, as the reference code's PNG round trip does; false: float16


class ValidationSpec(StrictModel):
    """SFBD's validation measure on held-back protected copies (engine/validation.py) and what it decides."""

    enabled: bool = True  # sfbd and online-sfbd: hold back copies, measure the model before each round and at the end
    fraction: float = Field(0.05, ge=0, lt=0.5)  # share of the protected copies held back (never trained on)
    min_size: int = Field(64, ge=8)  # at least this many (the measure is off when that is over a quarter of the copies)
    max_size: int = Field(256, ge=8)  # and at most this many: the measure's cost does not grow with the data
    size: int | None = Field(None, ge=8)  # exactly this many (overrides fraction, min_size, max_size)
    probes: int = Field(2, ge=1)  # Rademacher probes of SURE's divergence term per image
    # a round whose model measures worse is rolled back and the run ends on the best model; off by default: neither
    # number tracked sample quality on both benchmark sets (benchmarks/README.md, "Quality on unseen data")
    keep_best: bool = False
    # which number decides: loss (the denoising loss at and above the copies' sigma, lower is better) or round_psnr (the
    # backward solver's estimated PSNR, which also sees the scales below sigma; higher is better)
    select_by: Literal["loss", "round_psnr"] = "loss"


class PrivacySpec(StrictModel):
    """DP-SGD (Opacus) in the stages that learn from protected data (engine/privacy.py)."""

    epsilon: float = Field(gt=0)  # (epsilon, delta)-DP per protected record, over all private steps of the run
    delta: float | None = Field(None, gt=0, lt=1)  # default 1 / (10 × protected records)
    max_grad_norm: float = Field(1.0, gt=0)  # per-sample gradient clipping norm
    accountant: Literal["rdp", "prv"] = "prv"  # Opacus accountant for the noise multiplier and the reports
    stages: list[Stage] | None = None  # default: the method's stages that read protected data (engine/methods.py)
    physical_batch: int = Field(64, ge=1)  # samples per forward/backward within a Poisson batch (memory bound)
    lr: float | None = Field(None, gt=0)  # learning rate of the private steps; default: optimizer.lr


class EmaSpec(StrictModel):
    halflife_kimg: float = Field(10.0, gt=0)  # EMA half-life, thousands of images
    rampup_ratio: float | None = Field(0.05, gt=0)  # half-life ≤ this × images seen (none: no ramp-up)


class SampleStageSpec(StrictModel):
    n: int = Field(64, ge=1)  # guard run: images drawn after training
    steps: int = Field(18, ge=1)  # sampler steps
    seed: int = 0  # image i depends only on (seed, i)
    batch: int = Field(64, ge=1)  # images per sampling batch


class AuditStageSpec(StrictModel):
    config: str | None = None  # guard run: audit settings YAML, relative to the pipeline file (default: built-in)


class ExecutorStageSpec(StrictModel):
    kind: Literal["local", "ray"] = "local"  # guard run's prepare and audit: this machine's processes, or Ray
    address: str | None = None  # with ray: auto | HOST:PORT | ray://HOST:PORT; none: start a Ray on this machine


class MlflowSpec(StrictModel):
    """Where `tracker: mlflow` logs (engine/trackers.py)."""

    # tracking URI: a server (http://HOST:PORT) or a file store (file:/abs/path); default file:<run>/mlruns, offline
    uri: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1)  # experiment name; default the pipeline's name


class InitSpec(StrictModel):
    """Start from another run's EMA weights (`guard train --init RUN`): its lineage is recorded and verified."""

    run: str  # the run directory, relative to the pipeline file
    checkpoint: str | None = None  # a checkpoint folder or ema.safetensors of that run; default its latest


class PipelineConfig(StrictModel):
    version: Literal[1]
    name: str = Field(min_length=1)
    data: str  # prepared directory, relative to the pipeline file; --data overrides
    verify_key: str | None = None  # data owner's Ed25519 public key (PEM): card.sig must verify; --verify-key overrides
    policy: str | None = None  # the policy that prepares `data` (used by `guard run`)
    method: Method = "clean-only"
    network: Literal["ddpmpp", "diffusers-unet2d"] = "ddpmpp"  # our U-Net, or diffusers' UNet2DModel (guard export)
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    batch: int = Field(64, ge=1)  # global batch size, split across processes
    schedule: ScheduleSpec = ScheduleSpec()
    denoise: DenoiseSpec = DenoiseSpec()
    sfbd: SFBDSpec = SFBDSpec()
    ema: EmaSpec = EmaSpec()
    validation: ValidationSpec = ValidationSpec()
    privacy: PrivacySpec | None = None  # differential privacy (DP-SGD); none: non-private
    init: InitSpec | None = None  # start from another run's EMA weights; none: random weights
    seed: int = 0  # seeds every random choice of the run
    threads: int | None = Field(None, ge=1)  # CPU threads per process; none: the CPUs it may use (--threads wins)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast: on CUDA, and on CPUs with native bf16 (else fp32)
    checkpoint_every: int = Field(200, ge=1)  # optimizer steps between checkpoints
    snapshot_every: int = Field(1000, ge=1)  # optimizer steps between sample grids
    grid_size: int = Field(64, ge=1)  # images in a snapshot grid
    keep_checkpoints: int = Field(3, ge=1)  # how many checkpoints to keep
    out: str | None = None  # run directory, relative to the pipeline file; default ./runs/<name>
    sample: SampleStageSpec = SampleStageSpec()  # what guard run samples after training
    audit: AuditStageSpec = AuditStageSpec()  # how guard run audits the samples
    executor: ExecutorStageSpec = ExecutorStageSpec()  # where guard run prepares and audits (docs/scale-out.md)
    # also log the run to TensorBoard (<run>/tensorboard) or MLflow (see mlflow): losses, learning rate, kimg/s,
    # snapshot grids, privacy spent, guard run's audit counts (engine/trackers.py, docs/pipelines.md); --tracker
    tracker: Literal["none", "tensorboard", "mlflow"] = "none"
    mlflow: MlflowSpec = MlflowSpec()  # with tracker: mlflow

    @model_validator(mode="after")
    def _checks(self) -> PipelineConfig:
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.model.model_channels % 4:
            raise ValueError("model.model_channels must be a multiple of 4")
        schedule, stages, method = self.schedule, stages_of(self.method), self.method
        adaptive = schedule.pretrain_until == "converged"
        if "pretrain" in stages and schedule.pretrain_kimg == 0:
            if self.init is None:
                raise ValueError(f"schedule.pretrain_kimg: 0 leaves method {method} nothing to denoise its first round "
                                 "with; give it a model to start from (init.run, guard train --init RUN)")
            if adaptive:
                raise ValueError("schedule.pretrain_kimg: 0 with init starts the rounds at once; set "
                                 "schedule.pretrain_until: kimg (converged decides when a pretraining ends)")
        if adaptive and "rounds" in stages:  # the rounds share what pretraining leaves of the budget
            if schedule.rounds < 1 or schedule.total_kimg is None or schedule.total_kimg <= schedule.pretrain_kimg:
                raise ValueError("schedule.pretrain_until: converged needs schedule.rounds >= 1 and schedule.total_kimg "
                                 "(the budget) > schedule.pretrain_kimg (the least pretraining)")
            if schedule.round_kimg:
                raise ValueError("schedule.round_kimg: the rounds share the budget left when pretraining has converged; "
                                 "drop it and set schedule.total_kimg")
        elif "rounds" in stages and (schedule.rounds < 1 or schedule.round_kimg <= 0):
            raise ValueError(f"method {method} needs schedule.rounds >= 1 and schedule.round_kimg > 0")
        rounds_end = schedule.pretrain_kimg + schedule.rounds * schedule.round_kimg
        fixed_rounds = "rounds" in stages and not adaptive
        if fixed_rounds and schedule.total_kimg is not None and abs(schedule.total_kimg - rounds_end) > 1e-9:
            raise ValueError(f"method {method} runs pretrain_kimg + rounds × round_kimg = {rounds_end:g} kimg; "
                             "drop schedule.total_kimg or make it equal")
        if adaptive and "rounds" in stages:  # other methods have no rounds to start: the setting does not apply
            if self.privacy is not None:
                raise ValueError("schedule.pretrain_until: converged decides on the held-back protected copies, which "
                                 "DP-SGD's accounting does not cover; give DP-SGD a fixed schedule: --set "
                                 "schedule.pretrain_until=kimg --set schedule.pretrain_kimg=40 --set schedule.round_kimg=20")
            if not self.validation.enabled:
                raise ValueError("schedule.pretrain_until: converged needs the validation measure (validation.enabled)")
        if "online" in stages:
            if schedule.total_kimg is None or schedule.total_kimg <= schedule.pretrain_kimg:
                raise ValueError(f"method {method} needs schedule.total_kimg > schedule.pretrain_kimg")
            start, end = schedule.ramp_start_kimg, schedule.ramp_end_kimg
            if start is not None and end is not None and end < start:
                raise ValueError("schedule.ramp_end_kimg must not be below schedule.ramp_start_kimg")
        return self


def load_pipeline(path: Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a pipeline YAML; `overrides` ({'a.b': value}) replace keys before validation.

    Relative `data`, `policy`, `verify_key`, `out` and `init.run` are resolved against the pipeline file.
    """
    data = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    config = validate_mapping(PipelineConfig, data, source=str(path))
    return resolve_paths(config, path.resolve().parent)


def resolve_paths(config: PipelineConfig, base: Path) -> PipelineConfig:
    def absolute(value: str | None) -> str | None:
        return None if value is None else str((base / value).resolve())

    out = absolute(config.out) if config.out else str(Path("runs", config.name).resolve())  # default: ./runs/<name>
    audit = config.audit.model_copy(update={"config": absolute(config.audit.config)})
    init = config.init.model_copy(update={"run": absolute(config.init.run),
                                          "checkpoint": absolute(config.init.checkpoint)}) if config.init else None
    return config.model_copy(update={"data": absolute(config.data), "policy": absolute(config.policy), "out": out,
                                     "audit": audit, "verify_key": absolute(config.verify_key), "init": init})
