"""Training / sampling throughput and backward-solver cost of the diffusion core on CPU.

Reference config (i) of sfbd.md: 16x16x3, model_channels 32, channel_mult [1, 2], 2 blocks per
resolution, attention at 8x8, dropout 0 (~1.03M parameters), batch 64, 2 threads, fp32.

Measures (a) training img/s (EDM loss + Adam + EMA), (b) 18-step Heun sampling img/s, (c) the
fp32 matmul peak of this machine in the same run, and training throughput as a fraction of that
peak from an analytic FLOP count, and (d) NFE and error of the SFBD backward solver on oracle
denoisers (and, with --trained-run, a trained digits network) against the reference 40-step
truncated EDM grid.

The host is a shared VM: timings are per step, interleaved across variants, and reported as
medians (with quartiles) to resist bursts of interference.

Example:
    PYTHONPATH=. python benchmarks/train_speed.py --json out/train_speed.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sfbd_guard.diffusion.ema import EMA
from sfbd_guard.diffusion.loss import EDMLoss
from sfbd_guard.diffusion.networks import UNetConfig, build_denoiser, count_parameters
from sfbd_guard.diffusion.optim import make_adam, optimizer_step
from sfbd_guard.diffusion.sampling import (
    backward_sigmas,
    count_nfe,
    denoise_backward,
    karras_sigmas,
    sample_heun,
)

REFERENCE = {"train_img_s": 153.6, "peak_gflops": 167.0, "fraction": 0.56, "gen18_img_s": 10.7,
             "denoise_0.59_img_s": 14.5, "denoise_1.3824_img_s": 9.6}
CONFIG_I = UNetConfig(model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(8,), dropout=0.0)


# ----------------------------------------------------------------------------- FLOP count
def count_forward_flops(net: nn.Module, x: Tensor, sigma: Tensor) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward: Conv2d, Linear, attention QK^T and AV."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += 2 * k * out.numel()
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * out.numel()
        elif type(module).__name__ == "SelfAttention":
            b, c, h, w = out.shape
            total += 2 * 2 * b * (h * w) ** 2 * c

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.no_grad():
        net(x, sigma)
    for handle in handles:
        handle.remove()
    return total


# ----------------------------------------------------------------------------- timing
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks instead of unmapping them (no page faults per step)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve big tensors from the heap
    return bool(ok and libc.mallopt(-1, 2**31 - 1))  # M_TRIM_THRESHOLD: never trim the heap


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Wall time of each of ``n`` calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarize(times: list[float], work: float) -> dict[str, float]:
    """Median and quartile rates ``work / time``."""
    q1, q2, q3 = statistics.quantiles(times, n=4)
    return {"median": work / q2, "q1": work / q3, "q3": work / q1, "best": work / min(times)}


def matmul_call(n: int = 2048) -> tuple[Callable[[], object], float]:
    """One fp32 n x n matmul and its FLOP count."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


# ----------------------------------------------------------------------------- training variants
@dataclass(frozen=True)
class Variant:
    """One way of running the *same* training step."""

    name: str
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False


def make_train_step(v: Variant, batch: int, res: int, seed: int = 0) -> tuple[Callable[[], None], nn.Module]:
    """EDM loss + Adam (EDM warm-up, grad sanitising) + EMA update on a fixed batch."""
    torch.manual_seed(seed)  # network initialisation
    net = build_denoiser(CONFIG_I, res, 3)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    ema = EMA(net, halflife_kimg=500, rampup_ratio=0.05)
    opt = make_adam(net.parameters(), lr=1e-3, fused=True if v.fused_adam else None)
    params = list(net.parameters())
    fwd = torch.compile(net) if v.compile else net
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    loss_fn, state = EDMLoss(), {"nimg": 0}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(fwd, x, generator=gen).mean().backward()
        optimizer_step(opt, params, base_lr=1e-3, cur_nimg=state["nimg"], warmup_kimg=10_000)
        state["nimg"] += batch
        ema.update(net, batch, state["nimg"])

    return step, ema.module


def bench_training(variants: list[Variant], args: argparse.Namespace) -> tuple[dict, dict, nn.Module]:
    """Interleave blocks of training steps of every variant with matmul-peak blocks."""
    steps = {}
    for v in variants:
        t0 = time.perf_counter()
        step, ema_net = make_train_step(v, args.batch, 16)
        for _ in range(args.warmup):
            step()
        steps[v.name] = (step, time.perf_counter() - t0)
    mm, mm_flops = matmul_call()
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak_times: list[float] = []
    for _ in range(args.blocks):
        peak_times += time_calls(mm, 4)
        for name, (step, _) in steps.items():
            times[name] += time_calls(step, args.steps)
    train = {n: summarize(t, args.batch) | {"setup_s": steps[n][1]} for n, t in times.items()}
    peak = summarize(peak_times, mm_flops / 1e9)
    return train, peak, ema_net


# ----------------------------------------------------------------------------- sampling speed
def bench_sampling(net: nn.Module, args: argparse.Namespace, channels_last: bool) -> dict[str, dict]:
    """img/s of 18-step Heun generation and of the backward solver at sigma 0.59 / 1.3824."""
    net = net.eval().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 16, 16, generator=gen, dtype=torch.float64)
    jobs = {
        "gen18": (karras_sigmas(18), 80.0),
        "denoise_0.59_ref40": (backward_sigmas(0.59, 40, rtol=0.0), 0.59),
        "denoise_1.3824_ref40": (backward_sigmas(1.3824, 40, rtol=0.0), 1.3824),
        "denoise_1.3824_trunc40": (backward_sigmas(1.3824, 40), 1.3824),
    }
    out = {}
    with torch.inference_mode():
        for name, (sigmas, start) in jobs.items():
            def run(sigmas: Tensor = sigmas, start: float = start) -> Tensor:
                return sample_heun(net, x * start, sigmas, state_dtype=torch.float64)

            out[name] = summarize(time_calls(run, args.sample_reps), args.batch)
            out[name]["nfe"] = count_nfe(sigmas)
    return out


# ----------------------------------------------------------------------------- backward-solver accuracy
def gaussian_oracle(mu: Tensor, s: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Exact denoiser for x ~ N(mu, s^2 I)."""
    return lambda x, sig: mu + s**2 / (s**2 + sig.reshape(-1, 1, 1, 1) ** 2) * (x - mu)


def gmm_oracle(centres: Tensor, h: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Exact denoiser for the mixture (1/K) sum_k N(c_k, h^2 I) (centres: (K, C, H, W))."""
    flat = centres.flatten(1)

    def denoiser(x: Tensor, sig: Tensor) -> Tensor:
        var = h**2 + sig.reshape(-1, 1) ** 2
        xf = x.flatten(1)
        logits = -torch.cdist(xf, flat).square() / (2 * var)
        m = torch.softmax(logits, dim=1) @ flat
        return (m + h**2 / var * (xf - m)).reshape(x.shape)

    return denoiser


def digits_problem(n_test: int, h: float) -> tuple[Callable, Tensor] | None:
    """Held-out scikit-learn digits (8x8, [-1, 1]) and a GMM oracle on the remaining digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    data = torch.as_tensor(load_digits().images, dtype=torch.float64) / 8.0 - 1.0
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
    data = data[perm].unsqueeze(1)
    return gmm_oracle(data[n_test:], h), data[:n_test]


def trained_denoiser(run: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A trained digits network (the EMA weights of a finished run, e.g. `make demo`'s runs/digits) as
    the denoiser: its real errors, no oracle."""
    from pathlib import Path

    from sfbd_guard.engine.service import load_ema_net

    net, _, _ = load_ema_net(Path(run), device="cpu")

    @torch.no_grad()
    def denoiser(x: Tensor, sig: Tensor) -> Tensor:
        return net(x.float(), sig.float().expand(x.shape[0])).double()

    return denoiser


def gaussian_problem(n_test: int, s: float) -> tuple[Callable, Tensor]:
    """Gaussian data N(mu, s^2 I) on 3x16x16 with a fixed random mean image."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 3, 16, 16, generator=gen, dtype=torch.float64) - 0.5
    return gaussian_oracle(mu, s), mu + s * torch.randn(n_test, 3, 16, 16, generator=gen, dtype=torch.float64)


def solver_errors(oracle: Callable, clean: Tensor, y: Tensor, sigma: float, exact: Tensor, **kw) -> dict:
    """MSE vs the clean image and RMS deviation from the converged PF-ODE solution."""
    out = denoise_backward(oracle, y, sigma, **kw)
    grid_kw = {k: v for k, v in kw.items() if k in ("grid", "rho", "sigma_min", "rtol")}
    return {"nfe": count_nfe(backward_sigmas(sigma, kw["steps"], **grid_kw)),
            "mse_clean": (out - clean).square().mean().item(),
            "ode_rms": (out - exact).square().mean().sqrt().item(), "out_std": out.std().item()}


# (grid, rho, sigma_min) families compared with the reference grid
GRID_FAMILIES = [("edm", 7.0, 0.002), ("fitted", 7.0, 0.002), ("fitted", 1.0, 0.002),
                 ("fitted", 2.0, 0.02), ("fitted", 1.0, 0.02)]


def search_grid(oracle: Callable, clean: Tensor, y: Tensor, sigma: float, exact: Tensor, ref: dict,
                family: tuple[str, float, float]) -> dict | None:
    """Smallest step count whose ODE error <= reference and whose MSE is within 1 % of it."""
    grid, rho, sigma_min = family
    for steps in range(3, 60):
        r = solver_errors(oracle, clean, y, sigma, exact, steps=steps, grid=grid, rho=rho, sigma_min=sigma_min)
        if r["ode_rms"] <= ref["ode_rms"] and abs(r["mse_clean"] - ref["mse_clean"]) <= 0.01 * ref["mse_clean"]:
            return r | {"grid": grid, "rho": rho, "sigma_min": sigma_min, "steps": steps,
                        "nfe_ratio": r["nfe"] / ref["nfe"]}
    return None


def bench_backward_solver(args: argparse.Namespace) -> list[dict]:
    """Reference 40-step truncated EDM grid vs better-placed grids on oracle denoisers."""
    problems = {"gaussian(s=0.5)": gaussian_problem(args.n_oracle, 0.5)}
    digits = digits_problem(args.n_oracle, 0.1)
    if digits is not None:
        problems["digits-gmm(h=0.1)"] = digits
    if args.trained_run:
        if digits is None:
            raise SystemExit("--trained-run needs scikit-learn's digits")
        problems["digits-trained-net"] = (trained_denoiser(args.trained_run), digits[1])  # the same held-out digits
    shipped = pipeline_grid()  # what the shipped digits pipeline runs, whether or not the search accepts it
    rows = []
    for pname, (oracle, clean) in problems.items():
        for sigma in (0.59, 1.3824):
            gen = torch.Generator().manual_seed(2)
            y = clean + sigma * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
            exact = denoise_backward(oracle, y, sigma, steps=512, grid="fitted")
            ref = solver_errors(oracle, clean, y, sigma, exact, steps=40, rtol=0.0)
            head = {"problem": pname, "sigma": sigma}
            rows.append(head | {"grid": "edm40-ref", "rho": 7.0, "sigma_min": 0.002, "steps": 40} | ref)
            for family in GRID_FAMILIES:
                found = search_grid(oracle, clean, y, sigma, exact, ref, family)
                if found is not None:
                    rows.append(head | found)
            mine = solver_errors(oracle, clean, y, sigma, exact, **shipped)
            rows.append(head | shipped | mine
                        | {"grid": f"{shipped['grid']} (digits.yaml)", "nfe_ratio": mine["nfe"] / ref["nfe"]})
    return rows


def pipeline_grid() -> dict:
    """steps, grid, rho and sigma_min of pipelines/digits.yaml's denoise section."""
    from pathlib import Path

    from sfbd_guard.engine.config import load_pipeline

    denoise = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "digits.yaml").denoise
    return denoise.model_dump(include={"steps", "grid", "rho", "sigma_min"})


# ----------------------------------------------------------------------------- report
def fmt_rate(r: dict) -> str:
    return f"{r['median']:8.1f} [{r['q1']:.1f}-{r['q3']:.1f}]"


def print_report(res: dict) -> None:
    """Human-readable tables."""
    fl, peak = res["flops"], res["peak_gflops"]
    print(f"\nconfig (i): {res['params']:,} params, fwd {fl['forward_gflop']:.2f} GFLOP/batch "
          f"(torch counter {fl['torch_counter_gflop']:.2f}), step {fl['step_gflop']:.2f} GFLOP; "
          f"matmul peak median {fmt_rate(peak)} GFLOP/s")
    print(f"\n(a) training, batch {res['batch']:d}                      img/s median [q1-q3]   frac of peak   setup s")
    for name, r in res["train"].items():
        print(f"  {name:40s} {fmt_rate(r)}   {r['fraction_of_peak']:.3f}        {r['setup_s']:.1f}")
    print(f"  {'reference (SFBD/EDM code)':40s} {REFERENCE['train_img_s']:8.1f}                 0.56")
    print("\n(b) sampling (EMA net, fp64 state)         img/s median [q1-q3]   NFE")
    for name, r in res.get("sampling", {}).items():
        print(f"  {name:40s} {fmt_rate(r)}   {r['nfe']}")
    print("\n(d) backward solver        sigma  grid       rho  s_min steps  NFE  NFE/ref  MSE(clean)  ODE-RMS   std(out)")
    for r in res.get("backward", []):
        print(f"  {r['problem']:24s} {r['sigma']:<6} {r['grid']:10s} {r['rho']:<4} {r['sigma_min']:<5} {r['steps']:5d}"
              f" {r['nfe']:4d}"
              f"  {r.get('nfe_ratio', 1.0):6.2f}  {r['mse_clean']:.5f}  {r['ode_rms']:.2e}  {r['out_std']:.4f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="training and sampling batch size")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--blocks", type=int, default=6, help="interleaved timing blocks")
    p.add_argument("--steps", type=int, default=8, help="training steps per block and variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    p.add_argument("--sample-reps", type=int, default=3, help="timed sampling batches per job")
    p.add_argument("--n-oracle", type=int, default=256, help="test images for the solver study")
    p.add_argument("--trained-run", default=None,
                   help="also study the solver with this finished digits run's EMA network (e.g. runs/digits)")
    p.add_argument("--variants", default="baseline,channels_last,fused_adam,channels_last+fused_adam",
                   help="comma list from baseline, channels_last, fused_adam, compile joined by '+'")
    p.add_argument("--no-mallopt", action="store_true", help="leave glibc's default heap trimming on")
    p.add_argument("--skip", default="", help="comma list of sections to skip: sampling, backward")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    return p.parse_args()


def parse_variant(spec: str) -> Variant:
    parts = set(spec.split("+")) - {"baseline"}
    unknown = parts - {"channels_last", "fused_adam", "compile"}
    if unknown:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)} in {spec!r}")
    return Variant(spec, "channels_last" in parts, "fused_adam" in parts, "compile" in parts)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"batch": args.batch, "threads": args.threads, "torch": torch.__version__,
                 "mallopt": (not args.no_mallopt) and keep_freed_memory(), "reference": REFERENCE}
    net = build_denoiser(CONFIG_I, 16, 3)
    x, sig = torch.randn(args.batch, 3, 16, 16), torch.ones(args.batch)
    fwd = count_forward_flops(net, x, sig)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, sig)
    res["params"] = count_parameters(net)
    res["flops"] = {"forward_gflop": fwd / 1e9, "step_gflop": 3 * fwd / 1e9,
                    "torch_counter_gflop": counter.get_total_flops() / 1e9}
    variants = [parse_variant(s) for s in args.variants.split(",")]
    train, peak, ema_net = bench_training(variants, args)
    for r in train.values():
        r["fraction_of_peak"] = r["median"] * 3 * fwd / args.batch / 1e9 / peak["median"]
    res |= {"train": train, "peak_gflops": peak}
    skip = set(args.skip.split(","))
    if "sampling" not in skip:
        res["sampling"] = {}
        for cl in (False, True):
            for k, v in bench_sampling(ema_net, args, cl).items():
                res["sampling"][k + ("/channels_last" if cl else "")] = v
    if "backward" not in skip:
        res["backward"] = bench_backward_solver(args)
    print_report(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
