"""Approximate nearest-neighbour search against the exact one, on the banks of a real ROI.

    .venv/bin/python bench/knn_approx.py > bench/out/knn_approx.json

The issue's CPU check: 100 magnetic-tile OK images fitted (shipped defaults: EfficientNet-Lite0 at 320,
fine + coarse branches), the patches of 30 other tiles searched. Per branch and method: median ms per
image, and the recall of the exact nearest neighbour (share of patches whose neighbour is the exact one).
Exact: the shipped search (faiss flat from 768 queries, torch below). Approximate: faiss IVF-Flat
(nlist / nprobe) and HNSW-Flat (M / efSearch). The question: does any reach recall >= 0.99 at a time small
enough for e2e / backbone <= 1.15?
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402
from timing import median_ms  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import RoiModel  # noqa: E402


def med(fn, runs: int = 9) -> float:
    return median_ms(fn, runs, warmup=1)


def main() -> None:
    tiles = sorted((shared_root() / "datasets" / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))
    ex = get_extractor("efficientnet_lite0", device="cpu")
    out: dict = {"threads": torch.get_num_threads(), "branches": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "bench", "tile", ex)
        model.fit_ok([(p.read_bytes(), decode_image(p.read_bytes()), {}) for p in tiles[:100]])
        embs = model.index.embed([decode_image(p.read_bytes()) for p in tiles[-30:]])
        out["backbone_ms"] = round(statistics.median(e.timings["backbone"] for e in embs), 2)
        for b, branch in enumerate(model.branches):
            bank = np.ascontiguousarray(branch.bank.feats.numpy())
            queries = [np.ascontiguousarray(e.feats[b]) for e in embs]
            truth = [np.argmax(q @ bank.T, 1) for q in queries]
            row = {"branch": branch.identity["name"], "bank": bank.shape[0], "dims": bank.shape[1],
                   "queries": queries[0].shape[0],
                   "exact_ms": med(lambda q=queries[0], br=branch: br.search(q)), "methods": []}

            def measure(name: str, index, row=row, queries=queries, truth=truth) -> None:
                hits = np.concatenate([index.search(q, 1)[1][:, 0] == t for q, t in zip(queries, truth, strict=True)])
                row["methods"].append({"method": name, "ms": med(lambda: index.search(queries[0], 1)),
                                       "recall": round(float(hits.mean()), 4)})

            for nlist, probes in ((64, (8, 16)), (128, (16, 32))):
                ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(bank.shape[1]), bank.shape[1], nlist,
                                         faiss.METRIC_INNER_PRODUCT)
                ivf.train(bank)
                ivf.add(bank)
                for nprobe in probes:
                    ivf.nprobe = nprobe
                    measure(f"ivf{nlist}/{nprobe}", ivf)
            for m in (16, 32):
                hnsw = faiss.IndexHNSWFlat(bank.shape[1], m, faiss.METRIC_INNER_PRODUCT)
                hnsw.hnsw.efConstruction = 80
                hnsw.add(bank)
                for ef in (16, 32, 64):
                    hnsw.hnsw.efSearch = ef
                    measure(f"hnsw{m}/{ef}", hnsw)
            out["branches"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
