"""Which views (patch branches) a ROI fuses, from evidence: held-out proxies, and labels once it has some.

The inputs are branch score rows ([samples, branches], each branch's own image score):
- `ok`: OK samples scored against a bank without them (cross-fitted: each fold against the bank without
  that fold, core/roi/tuning.py);
- `proxies`: synthetic defects (core/method/evidence/proxy.py) made from OK samples, each scored against the bank
  without its source's fold: judged the way a real defect on a new part is;
- `ng` / `ok_loo`: the ROI's labelled NG samples (never in the bank) and its OK leave-one-out scores.

Every non-empty set of branches is a candidate (coarse-only sets included). A set's figure is the AUROC of
its fused scores (the mean of per-branch z-scores, as predictions fuse: core/method/fusion.py) of the
proxies against the OK samples; with `MIN_LABELS` labelled NG samples or more, the mean of that and the
labels' AUROC against the OK leave-one-out scores, so ten noisy labels weigh as much as the proxies and
cannot overturn a clear proxy result alone.

Stability: the set in force (the incumbent) is replaced only when the best candidate beats it in at least
`CONFIDENCE` of `ROUNDS` bootstrap resamples of the samples (OK, proxies and labels resampled together)
and by `MARGIN` on the full data: a gain within the choice's own noise changes nothing, so one more NG
sample or one OK sample fewer does not flip the views.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

MIN_LABELS = 5  # labelled NG samples (not suspects) from which labels weigh in
ROUNDS = 200  # bootstrap resamples measuring the choice's noise
CONFIDENCE = 0.95  # the best set must beat the incumbent in this share of them
MARGIN = 0.03  # and by at least this much on all the samples (smaller gains did not hold on unseen kinds:
#                docs/benchmarks.md, "Views chosen by evidence")


def candidates(n_branches: int) -> list[tuple[int, ...]]:
    """Every non-empty set of branches, smallest first."""
    return [c for k in range(1, n_branches + 1) for c in itertools.combinations(range(n_branches), k)]


def name(subset: tuple[int, ...]) -> str:
    return "+".join(map(str, subset))


def _z(rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mu, sd = ref.mean(0), ref.std(0)
    return (rows - mu) / np.maximum(sd, np.maximum(0.05 * np.abs(mu), 1e-6))


def _auroc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of positives over negatives along the last axis (Mann-Whitney, ties count a half);
    neg [..., n], pos [..., m] -> [...]."""
    gt = (pos[..., :, None] > neg[..., None, :]).mean((-1, -2))
    eq = (pos[..., :, None] == neg[..., None, :]).mean((-1, -2))
    return gt + 0.5 * eq


@dataclass
class Evidence:
    ok: np.ndarray  # [n, B] held-out OK scores
    proxies: np.ndarray  # [m, B] held-out proxy scores
    ng: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [k, B] labelled NG scores
    ok_loo: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [n', B] OK leave-one-out scores

    @property
    def labelled(self) -> bool:
        return len(self.ng) >= MIN_LABELS and len(self.ok_loo) >= 2


@dataclass
class Choice:
    active: tuple[int, ...]
    by: str  # "proxy" or "proxy+labels": what the figures were made of
    changed: bool  # the incumbent was replaced
    gain: float  # best candidate's figure minus the incumbent's
    wins: float  # share of bootstrap resamples in which the best beat the incumbent
    figures: dict[str, dict[str, float]]  # per candidate: proxy, labels, figure


def _figures(ev: Evidence, sets: list[tuple[int, ...]], idx: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """[len(sets)] figures (or [len(sets), 2]: proxy, labels) of every candidate on a resample `idx`."""
    ok, px = ev.ok, ev.proxies
    zo, zp = _z(ok, ok), _z(px, ok)
    out = np.zeros((len(sets), 2))
    if ev.labelled:
        zl, zn = _z(ev.ok_loo, ev.ok_loo), _z(ev.ng, ev.ok_loo)
    for j, s in enumerate(sets):
        cols = list(s)
        o, p = zo[:, cols].mean(1), zp[:, cols].mean(1)
        if idx is not None:
            o, p = o[idx[0]], p[idx[1]]
        out[j, 0] = _auroc(o, p)
        if ev.labelled:
            lo, ln = zl[:, cols].mean(1), zn[:, cols].mean(1)
            if idx is not None:
                lo, ln = lo[idx[2]], ln[idx[3]]
            out[j, 1] = _auroc(lo, ln)
    return out


def combine(parts: np.ndarray, labelled: bool) -> np.ndarray:
    return parts[..., 0] if not labelled else 0.5 * (parts[..., 0] + parts[..., 1])


def choose(ev: Evidence, incumbent: tuple[int, ...], seed: int = 0) -> Choice:
    """The set to fuse: the best candidate when it beats the incumbent beyond the noise, else the incumbent."""
    n_branches = ev.ok.shape[1]
    sets = candidates(n_branches)
    if incumbent not in sets:
        incumbent = tuple(range(n_branches))
    labelled = ev.labelled
    parts = _figures(ev, sets)
    fig = combine(parts, labelled)
    inc = sets.index(incumbent)
    # a set may replace the incumbent only where no part of the evidence says it is worse
    allowed = np.all(parts[:, : 1 + labelled] >= parts[inc, : 1 + labelled] - 1e-9, axis=1)
    best = int(np.argmax(np.where(allowed, np.round(fig, 6), -np.inf)))
    gain = float(fig[best] - fig[inc])
    wins = 0.0
    if best != inc and gain >= MARGIN:
        rng = np.random.default_rng(seed)
        sizes = (len(ev.ok), len(ev.proxies), len(ev.ok_loo), len(ev.ng))
        pair = [sets[best], sets[inc]]
        won = 0
        for _ in range(ROUNDS):
            idx = tuple(rng.integers(0, n, n) if n else np.zeros(0, int) for n in sizes)
            f = combine(_figures(ev, pair, idx), labelled)
            won += f[0] > f[1]
        wins = float(won / ROUNDS)
    changed = bool(best != inc and gain >= MARGIN and wins >= CONFIDENCE)
    figures = {name(s): {"proxy": round(float(parts[j, 0]), 4),
                         **({"labels": round(float(parts[j, 1]), 4)} if labelled else {}),
                         "figure": round(float(fig[j]), 4)} for j, s in enumerate(sets)}
    return Choice(sets[best] if changed else incumbent, "proxy+labels" if labelled else "proxy", changed,
                  round(gain, 4), round(wins, 3), figures)
