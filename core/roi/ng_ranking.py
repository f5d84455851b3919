"""A ROI's NG samples in its ranking (config `ng_rank: auto`): whether the ROI adds the NG-aware term of
core/method/ng_rank.py, its record in the manifest (`ng_rank`: the form, why, each form's cross-validated
gain), and the term rebuilt from that record and the stored samples when the ROI is loaded.

Decided at each threshold update over the branches the ROI fuses; nothing but the record is stored: the
heads are refitted at a load from the NG samples' indexed features (a few hundred patches, well under a
second), so a rollback, an import or a hand-edited file never brings a head the samples do not back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from core.method.branch import Branch
from core.method.fusion import BranchScale
from core.method.ng_rank import (
    MAX_FIT,
    Choice,
    NgTerm,
    choose,
    fit_heads,
    fit_term,
    next_step,
    spread_of,
    top_rows,
)
from core.method.scorer import Scorer
from core.roi.index import RoiIndex
from core.roi.sample_scores import SampleScorer

log = logging.getLogger(__name__)


def _banks(branches: Sequence[Branch], active: Sequence[int]) -> list[np.ndarray]:
    return [branches[b].bank.feats.numpy() for b in active]  # type: ignore[attr-defined]


def decide(setting: str, rows: SampleScorer, ok: list[float], ng: list[float], active: Sequence[int],
           branches: Sequence[Branch], name: str, suspects: set[str] | frozenset[str] = frozenset(),
           manifest: dict | None = None) -> tuple[dict | None, NgTerm | None, list[float], list[float]]:
    """(manifest record, term or None, OK scores, NG scores) after this threshold update's round; the scores
    carry the term when one is used (the NG samples' cross-validated one) and so does `rows.by_sample`.
    `suspects`: NG samples that score like good parts (lifecycle.find_ng_suspects): no term learns from
    them and their scores do not place the threshold (they are left out of the NG scores returned).
    `manifest`: the ROI's last one; the form it records stays unless another clearly gains more."""
    previous = (manifest or {}).get("ng_rank") or {}
    incumbent, decided_at = previous.get("form"), previous.get("decided_at")
    all_ids = list(rows.ng_rows["ids"])
    keep = [i for i, sid in enumerate(all_ids) if sid not in suspects] if len(all_ids) == len(ng) else \
        list(range(len(ng)))
    ng = [ng[i] for i in keep]
    if setting == "off" or not ng:
        return None, None, ok, ng
    ok_tops = [[t[b] for b in active] for t in rows.ok_rows["tops"]]
    all_tops = [[t[b] for b in active] for t in rows.ng_rows["tops"]]
    ng_tops = [all_tops[i] for i in keep] if len(all_tops) == len(all_ids) else all_tops
    banks = _banks(branches, active)
    try:
        hold = isinstance(decided_at, int) and decided_at <= len(ng) < next_step(decided_at)
        choice = choose(ok, ng, ok_tops, ng_tops, banks, incumbent=incumbent,
                        hold_until=next_step(decided_at) if hold else None)
        term = fit_term(choice.form, banks, ok_tops, ng_tops, spread_of(ok)) if choice.form else None
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as e:  # degenerate samples: the plain score, said
        log.warning("%s: NG-aware term not fitted (%s): NG samples move only the threshold", name, e)
        choice, term = Choice(None, {}, [], f"could not be fitted: {str(e)[:200]}"), None
    record: dict = {"form": choice.form, "reason": choice.reason, "cv_auroc_gain": choice.gains,
                    "ng_samples": len(all_ids), "active": list(active)}
    if choice.gains:  # decided (or held) from enough samples: the growth step it belongs to
        record["decided_at"] = decided_at if hold else len(ng)
    if suspects & set(all_ids):
        record["ignored"] = sorted(suspects & set(all_ids))  # refitting at a load leaves the same ones out
    log.info("%s: NG-aware term %s (%s; cross-validated AUROC gains %s)", name, choice.form or "not used",
             choice.reason, choice.gains)
    if term is None:
        return record, None, ok, ng
    ok = [x + term(t) for x, t in zip(ok, ok_tops, strict=True)]
    ng = [x + d for x, d in zip(ng, choice.ng_terms, strict=True)]
    by_ng = {sid: rows.by_sample.get("ng", {}).get(sid, 0.0) + term(all_tops[i])  # a suspect: as a prediction
             for i, sid in enumerate(all_ids) if sid in suspects}
    by_ng.update(zip([all_ids[i] for i in keep], ng, strict=True))
    rows.by_sample = {"ok": dict(zip([i for i in rows.ok_rows["ids"] if i is not None], ok, strict=True)),
                      "ng": by_ng}
    record.update(scales=[s.to_dict() for s in term.scales], spread=term.spread)
    return record, term, ok, ng


def rebuild(record: dict | None, index: RoiIndex, active: Sequence[int]) -> NgTerm | None:
    """The term a manifest's record names, refitted from the stored NG samples; None when the record uses
    none or no longer fits the ROI (other branches, other NG samples): the caller updates the threshold."""
    if not record or record.get("form") is None or not index.ready:
        return None
    scales = record.get("scales") or []
    entries = index.entries("ng")
    if list(record.get("active", [])) != list(active) or len(scales) != len(active) or \
            len(entries) != record.get("ng_samples"):
        return None
    arrays = index.arrays("ng")
    ng_tops = []
    ignored = set(record.get("ignored") or [])
    used = [i for i in range(len(entries)) if index.branches[active[0]].emb["ng"].entries[i].get("sample_id")
            not in ignored] if active else []
    for i in used[-MAX_FIT:]:  # the heads learn from these (the most recent, suspects left out)
        per = []
        for b in active:
            e = index.branches[b].emb["ng"].entries[i]
            feats = np.array(arrays[b][e["offset"] : e["offset"] + e["count"]])  # a copy: the index is read-only
            per.append(feats[top_rows(index.branches[b].search(feats))])
        ng_tops.append(per)
    try:
        heads = fit_heads(record["form"], _banks(index.branches, active), ng_tops)
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as e:
        log.warning("NG-aware term %s could not be refitted (%s): the threshold is decided again", record["form"], e)
        return None
    return NgTerm(record["form"], heads, [BranchScale(**s) for s in scales], float(record["spread"]))


def restore(manifest: dict, index: RoiIndex, scorer: Scorer) -> bool:
    """At a load: give `scorer` the term its manifest's record names, if the threshold update of the load
    did not already. True: the record no longer fits the ROI, the threshold must be decided again."""
    if scorer.ng is not None or not (manifest.get("ng_rank") or {}).get("form"):
        return False
    scorer.ng = rebuild(manifest["ng_rank"], index, scorer.active)
    return scorer.ng is None
