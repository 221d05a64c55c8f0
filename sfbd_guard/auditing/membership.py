"""Membership inference against a trained denoiser: the score of an image and the statistics of a group of them.

The score is the loss-based attack on diffusion models (Carlini et al. 2023; Matsumoto et al. 2023): a model
denoises the images it trained on better than images it never saw. For an image x in [-1, 1] and each noise level
σ_l, the model denoises x + σ_l ε_{l,d} for `draws` fixed noise images ε_{l,d}; the error at that level is the mean
squared error of D(x + σ_l ε; σ_l) against x, averaged over the draws. The noise images are drawn once from a
seeded generator and are the same for every image and every model (common random numbers), so two images, or two
models on one image, differ only in what the model does. The membership score is minus the mean over levels of
the log error: higher means better denoised, more member-like; the log makes each level count alike whatever its
scale. docs/audit.md says why this attack and not SecMI or PIA.

Statistics of one group against the holdout (images never trained on): the ROC AUC (Mann-Whitney, ties count a
half), the TPR at 1 % FPR, each with a percentile bootstrap 95 % interval (both groups resampled, seeded), and, when
a selection-control model is given, the paired bootstrap interval of AUC(model) − AUC(control) on the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Progress = Callable[[int], None]
FPR = 0.01


def common_noise(shape: tuple[int, int, int], levels: int, draws: int, seed: int) -> np.ndarray:
    """(levels, draws, C, H, W) standard normal images: the same for every image and model of a test."""
    return np.random.default_rng(seed).standard_normal((levels, draws, *shape)).astype(np.float32)


def denoising_errors(net: object, pixels: np.ndarray, sigmas: list[float], noise: np.ndarray, *, batch: int,
                     device: str = "cpu", progress: Progress | None = None) -> np.ndarray:
    """(N, levels) mean squared denoising error of each uint8 image (N, C, H, W) at each σ, averaged over the draws."""
    import torch

    model = net  # a callable D(x, sigma), in eval mode
    errors = np.zeros((len(pixels), len(sigmas)), dtype=np.float64)
    eps = torch.from_numpy(noise).to(device)
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[start : start + batch].astype(np.float32) / 127.5 - 1).to(device)
            for level, sigma in enumerate(sigmas):
                total = torch.zeros(len(x), dtype=torch.float64, device=device)
                for draw in range(noise.shape[1]):
                    noisy = x + sigma * eps[level, draw]
                    sig = torch.full((len(x),), sigma, device=device)
                    denoised = model(noisy, sig)  # type: ignore[operator]
                    total += (denoised.float() - x).square().flatten(1).mean(dim=1).double()
                errors[start : start + len(x), level] = (total / noise.shape[1]).cpu().numpy()
            if progress:
                progress(len(x))
    return errors


def membership_score(errors: np.ndarray) -> np.ndarray:
    """Minus the mean log error over the levels: higher is more member-like."""
    score: np.ndarray = -np.log(np.maximum(errors, 1e-30)).mean(axis=1)
    return score


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of another) + P(tie)/2: the ROC AUC, by ranks."""
    from scipy.stats import rankdata

    if not len(members) or not len(others):
        return float("nan")
    ranks = rankdata(np.concatenate([members, others]))
    n1, n0 = len(members), len(others)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(members: np.ndarray, others: np.ndarray, fpr: float = FPR) -> float:
    """The share of members scoring above the threshold that at most `fpr` of the others exceed."""
    if not len(members) or not len(others):
        return float("nan")
    allowed = int(np.floor(fpr * len(others)))  # others allowed above the threshold
    threshold = np.sort(others)[::-1][allowed]  # the largest threshold at that false-positive rate
    return float((members > threshold).mean())


@dataclass(frozen=True)
class Comparison:
    """One group against the holdout, under one model (and, if given, the paired difference to a control model)."""

    auc: float
    auc_ci95: tuple[float, float]
    tpr: float
    tpr_ci95: tuple[float, float]
    difference_ci95: tuple[float, float] | None = None  # AUC(model) − AUC(control), paired bootstrap


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return (float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return (float(low), float(high))


def compare(members: np.ndarray, others: np.ndarray, *, resamples: int, seed: int,
            control: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Comparison, Comparison | None]:
    """The group's scores `members` against the holdout's `others`; `control`: the same images' scores under a model
    that never trained on the group. Both models' intervals use the same resamples, so their difference is paired."""
    rng = np.random.default_rng(seed)
    n1, n0 = len(members), len(others)
    picks = [(rng.integers(0, n1, n1), rng.integers(0, n0, n0)) for _ in range(resamples)]

    def stats(pos: np.ndarray, neg: np.ndarray) -> tuple[Comparison, np.ndarray]:
        aucs = np.array([auc(pos[i], neg[j]) for i, j in picks])
        tprs = np.array([tpr_at_fpr(pos[i], neg[j]) for i, j in picks])
        return Comparison(auc(pos, neg), _interval(aucs), tpr_at_fpr(pos, neg), _interval(tprs)), aucs

    main, main_aucs = stats(members, others)
    if control is None:
        return main, None
    base, base_aucs = stats(*control)
    main = Comparison(main.auc, main.auc_ci95, main.tpr, main.tpr_ci95, _interval(main_aucs - base_aucs))
    return main, base


def distinguishable(result: Comparison, margin: float) -> bool:
    """The reviewer's flag: the group is told apart from the holdout beyond `margin`. With a control model, the
    paired interval of AUC(model) − AUC(control) lies above `margin` (a selection difference that the control shows
    too is not counted); without one, the AUC's interval lies above 0.5 + `margin`."""
    if result.difference_ci95 is not None:
        return bool(result.difference_ci95[0] > margin)
    return bool(result.auc_ci95[0] > 0.5 + margin)


def power_words(members: int, others: int) -> str:
    """How small an AUC above 0.5 a test of this size can see (the half-width of the AUC's interval at 0.5)."""
    if not members or not others:
        return "no images: the test says nothing"
    half = 1.96 * np.sqrt((members + others + 1) / (12 * members * others))  # the AUC's standard error at 0.5
    return (f"with {members} images against {others} holdout images, an AUC within about ±{half:.3f} of 0.5 cannot "
            "be told from chance: a smaller memorisation would go unseen" + (
                "; add images (membership.max_images, more holdout records) for a sharper test" if half > 0.05 else ""))
