"""Exact 1-NN search on the CPU: faiss IndexFlatIP vs torch matmul, by query count and feature size.

    .venv/bin/python bench/knn_backends.py > bench/out/knn_backends.json

Queries are a sample's patches (EfficientNet-Lite0 blocks 4+10, 152 dims, stride 8: 576 at 192²,
1600 at 320²; DINOv2 ViT-S/14, 384 dims: 1024 at 448²) or a few patches (threshold updates by bank
delta); the bank is at the shipped cap (8192). The cost of an exact search does not depend on the
values, so unit random vectors stand in for features. Median ms of --runs after warm-up, both backends
measured in turns in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.method.knn import NearestNeighbour  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dim in (152, 384):  # EfficientNet-Lite0 blocks 4+10, DINOv2 ViT-S
        bank = torch.nn.functional.normalize(torch.randn(args.bank, dim, generator=gen), dim=1)
        backends = {"faiss": NearestNeighbour(bank, "faiss"), "torch": NearestNeighbour(bank, "torch")}
        for nq in (8, 40, 144, 256, 576, 1024, 1600):
            q = torch.nn.functional.normalize(torch.randn(nq, dim, generator=gen), dim=1)
            times: dict[str, list[float]] = {k: [] for k in backends}
            for r in range(args.runs + 2):
                for name, nn in backends.items():
                    t0 = time.perf_counter()
                    nn.search(q)
                    if r >= 2:
                        times[name].append((time.perf_counter() - t0) * 1000)
            med = {k: round(statistics.median(v), 2) for k, v in times.items()}
            rows.append({"dim": dim, "queries": nq, "faiss_ms": med["faiss"], "torch_ms": med["torch"],
                         "faiss_over_torch": round(med["faiss"] / med["torch"], 2)})
    print(json.dumps({"bank": args.bank, "threads": torch.get_num_threads(), "runs": args.runs, "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
