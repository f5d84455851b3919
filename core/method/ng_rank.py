"""NG labels in the ranking: an NG-aware term added to a ROI's score, chosen and guarded by the ROI itself.

Labelled NG samples say what this station's defects look like. Two simple forms turn that into a figure per
image, each per branch on the image's most anomalous patches (its top `TOP_SHARE` by OK distance):

- `ng_bank`: minus the mean distance of those patches to the labelled images' own top patches (a part that
  looks like a labelled defect ranks higher);
- `linear_head`: the mean logit of a logistic regression, OK bank patches vs the labelled top patches.

Neither form is right everywhere (docs/benchmarks.md, "NG labels in the ranking": the head helped magnetic
tile and hurt tire and juice bottle, the bank the reverse), so a ROI picks by 3-fold cross-validation over
its own NG samples: a form is used only when its fused score separates the held-out NG samples from the OK
leave-one-out scores by at least `GUARD` AUROC more than the plain score, and only with `MIN_NG` NG samples.
The term is each branch's figure standardised by the OK samples' own figures (`BranchScale`), summed, in
the units of the score (times the spread of the OK scores): score' = score + spread * sum_b z_b. The NG
samples' scores for the threshold are the cross-validated ones (a form scores its own training images too
well). Nothing here learns features: the backbone stays frozen, the head is linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from core.method.fusion import BranchScale
from core.method.knn import NearestNeighbour

TOP_SHARE = 0.02  # an image's most anomalous share of patches
MIN_NG = 5  # fewer NG samples: the plain score (with 1 per class a form was worse on tire)
MIN_OK = 8  # fewer leave-one-out OK scores: no judgement
GUARD = 0.02  # cross-validated AUROC gain a form needs over the plain score
SWITCH = 0.02  # another form replaces the one in use only when it gains this much more AUROC
REGROW = 1.5  # the form is decided again when the NG samples have grown by half since it was decided


def next_step(decided_at: int) -> int:
    """The NG sample count at which a form decided at `decided_at` samples is decided again (5, 8, 12, 18...)."""
    return max(decided_at + 1, math.ceil(decided_at * REGROW))
FOLDS = 3
FORMS = ("ng_bank", "linear_head")
NEGATIVES = (20, 500)  # OK bank patches a head sees: 20 per NG patch + 500, at most the bank
MAX_FIT = 40  # a head learns from at most this many (the most recent) NG samples

Tops = list[np.ndarray]  # one image's top patches per branch: [n_top, D] each


def top_count(patches: int) -> int:
    """How many of an image's patches are its most anomalous: `TOP_SHARE`, at least one."""
    return max(1, int(round(TOP_SHARE * patches)))


def top_rows(dist: np.ndarray) -> np.ndarray:
    """Positions of the most anomalous `TOP_SHARE` of an image's patches, by OK distance."""
    return np.argsort(dist, kind="stable")[-top_count(len(dist)):]


class Head:
    """One branch's NG figure, fitted on OK bank patches and the labelled NG images' top patches."""

    def __init__(self, form: str, ok_bank: np.ndarray, ng_tops: Sequence[np.ndarray], seed: int = 0) -> None:
        if form not in FORMS:
            raise ValueError(f"unknown NG form {form!r}")
        self.form = form
        pos = np.concatenate(list(ng_tops)).astype(np.float32)
        if form == "ng_bank":
            self.knn = NearestNeighbour(torch.from_numpy(pos), backend="torch")
            return
        n_neg = min(len(ok_bank), NEGATIVES[0] * len(pos) + NEGATIVES[1])
        neg = ok_bank[np.random.default_rng(seed).choice(len(ok_bank), n_neg, replace=False)]
        x = np.r_[neg, pos]
        y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
        model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=500).fit(x, y)
        self.w = model.coef_[0].astype(np.float64)
        self.b = float(model.intercept_[0])

    def figure(self, tops: np.ndarray) -> float:
        """An image's figure from its top patches (higher: more like the labelled defects)."""
        if self.form == "ng_bank":
            return -float(self.knn.distances(torch.from_numpy(np.ascontiguousarray(tops, np.float32))).mean())
        return float((tops.astype(np.float64) @ self.w + self.b).mean())


@dataclass
class NgTerm:
    """A fitted form: per branch a head and the scale of its figures on the OK samples; `spread`: the OK
    scores' standard deviation (the term's unit)."""

    form: str
    heads: list[Head]
    scales: list[BranchScale]
    spread: float

    def __call__(self, tops: Tops) -> float:
        z = sum((h.figure(t) - s.mean) / s.std for h, s, t in zip(self.heads, self.scales, tops, strict=True))
        return float(self.spread * z)


def fit_heads(form: str, ok_banks: Sequence[np.ndarray], ng_tops: Sequence[Tops], seed: int = 0) -> list[Head]:
    """One head per branch from the most recent `MAX_FIT` NG samples (a ROI labelled for months stays quick
    to update)."""
    recent = list(ng_tops)[-MAX_FIT:]
    return [Head(form, ok_banks[b], [t[b] for t in recent], seed) for b in range(len(ok_banks))]


def fit_term(form: str, ok_banks: Sequence[np.ndarray], ok_tops: Sequence[Tops], ng_tops: Sequence[Tops],
             spread: float, seed: int = 0) -> NgTerm:
    """A form fitted on `ng_tops`, scaled by its figures on the OK samples' `ok_tops`."""
    heads = fit_heads(form, ok_banks, ng_tops, seed)
    scales = [BranchScale.of([h.figure(t[b]) for t in ok_tops]) for b, h in enumerate(heads)]
    return NgTerm(form, heads, scales, spread)


def spread_of(ok_scores: Sequence[float]) -> float:
    return BranchScale.of(list(ok_scores)).std


@dataclass
class Choice:
    """What a ROI decided: the form (None: the plain score), every form's cross-validated AUROC gain, the
    NG samples' cross-validated terms for the chosen form (for the threshold), and why."""

    form: str | None
    gains: dict[str, float]
    ng_terms: list[float]
    reason: str


def choose(ok_scores: Sequence[float], ng_scores: Sequence[float], ok_tops: Sequence[Tops],
           ng_tops: Sequence[Tops], ok_banks: Sequence[np.ndarray], seed: int = 0,
           incumbent: str | None = None, hold_until: int | None = None) -> Choice:
    """The form a ROI uses, from its own samples: OK leave-one-out scores and top patches, NG scores and top
    patches, each branch's OK bank. `incumbent`: the form in use; it stays while its gain is at least half the
    guard and no other form gains `SWITCH` more; `hold_until`: until the ROI has this many NG samples (its next
    growth step) the incumbent stays whatever the gains (one more NG sample does not flip the form)."""
    if len(ng_tops) < MIN_NG:
        return Choice(None, {}, [], f"fewer than {MIN_NG} NG samples")
    if len(ok_tops) < MIN_OK:
        return Choice(None, {}, [], f"fewer than {MIN_OK} OK samples scored leave-one-out")
    ok, ng = np.asarray(ok_scores, np.float64), np.asarray(ng_scores, np.float64)
    labels = np.r_[np.zeros(len(ok)), np.ones(len(ng))]
    plain = roc_auc_score(labels, np.r_[ok, ng])
    spread = spread_of(ok)
    folds = np.arange(len(ng)) % FOLDS
    np.random.default_rng(seed).shuffle(folds)
    gains, cv_terms = {}, {}
    for form in FORMS:
        terms = np.zeros(len(ng))
        ok_fused = np.zeros(len(ok))
        for f in range(FOLDS):
            held = np.flatnonzero(folds == f)
            fit = [ng_tops[i] for i in np.flatnonzero(folds != f)]
            term = fit_term(form, ok_banks, ok_tops, fit, spread, seed)
            terms[held] = [term(ng_tops[i]) for i in held]
            ok_fused += ok + np.array([term(t) for t in ok_tops])
        auc = roc_auc_score(labels, np.r_[ok_fused / FOLDS, ng + terms])
        gains[form] = round(float(auc - plain), 4)
        cv_terms[form] = terms.tolist()
    best = max(FORMS, key=lambda f: gains[f])
    if hold_until is not None:
        return Choice(incumbent, gains, cv_terms[incumbent] if incumbent else [],
                      f"{incumbent or 'the plain score'} kept until {hold_until} NG samples (decided at a growth step)")
    if incumbent in gains and gains[incumbent] >= GUARD / 2 and gains[best] - gains[incumbent] < SWITCH:
        return Choice(incumbent, gains, cv_terms[incumbent], f"{incumbent} kept: gains {gains[incumbent]} AUROC in "
                      f"{FOLDS}-fold cross-validation, no form {SWITCH} more")
    if gains[best] < GUARD:
        return Choice(None, gains, [], f"no form gains {GUARD} AUROC over the plain score in cross-validation")
    return Choice(best, gains, cv_terms[best], f"{best} gains {gains[best]} AUROC in {FOLDS}-fold cross-validation")
