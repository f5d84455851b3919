"""Latency on this machine: bare backbone forward vs end-to-end predict, fit cost, RAM, start-up.

    .venv/bin/python bench/latency.py > bench/out/latency.json

Per backbone and resolution (DINOv2 with seeded random weights: same cost as the real ones):
- backbone_ms: the forward pass alone on a preprocessed tensor (median of --runs after warm-up);
- e2e_ms: file bytes -> decoded image -> `RoiModel.predict` result, with a bank fitted from --bank
  real OK images (magnetic tile MT_Free), and e2e / backbone measured in the same run;
- fit: per image, backbone (embed) vs coreset selection time, and the bank's RAM;
- startup_s: opening a ROI with --startup-samples stored samples from its index (separate ROI).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import shared_root  # noqa: E402
from timing import median_ms  # noqa: E402

from core.backbones import get_extractor  # noqa: E402
from core.image_io import decode_image  # noqa: E402
from core.roi.model import ModelSettings, RoiModel  # noqa: E402


def variants(paths: list[Path], n: int) -> list[bytes]:
    """n distinct PNGs from the files: the originals, then flipped / rotated copies."""
    out: list[bytes] = []
    ops = [lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: np.rot90(a, 2), lambda a: a[::-1, ::-1].T]
    for op in ops:
        for p in paths:
            if len(out) == n:
                return out
            arr = np.ascontiguousarray(op(np.asarray(Image.open(p).convert("L"))))
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append(buf.getvalue())
    return out


def bench_config(name: str, res: int, random_w: bool, bank_imgs: list[bytes], probe: bytes, runs: int) -> dict:
    name, _, taps = name.partition("@")  # name@4-10: one branch with those blocks; plain name: the default
    kw = {"layers": tuple(int(t) for t in taps.split("-"))} if taps else {}
    ex = get_extractor(name, resolution=res, random_weights=random_w, device="cpu", **kw)
    img = decode_image(probe)
    batch = ex.preprocess([img.rgb])
    backbone_ms = median_ms(lambda: ex.forward_branches(batch), runs)  # every branch's blocks: one pass
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "bench", "roi", ex, ModelSettings())
        samples = [(b, decode_image(b), {"source": "bench"}) for b in bank_imgs]
        t0 = time.perf_counter()
        embed_ms = coreset_ms = 0.0
        for i in range(0, len(samples), 8):
            rep = model.fit_ok(samples[i : i + 8], finalize=False)
            embed_ms += rep["timings_ms"]["embed"]
            coreset_ms += rep["timings_ms"]["coreset"]
        t1 = time.perf_counter()
        model.finalize()
        threshold_s = time.perf_counter() - t1
        fit_s = t1 - t0

        def e2e() -> None:
            model.predict([decode_image(probe)])

        e2e_ms = median_ms(e2e, runs)
        backbone_again = median_ms(lambda: ex.forward_branches(batch), runs)
        res_parts = model.predict([decode_image(probe)])[0].timings_ms
        bank_mb = sum(b.bank.feats.numel() for b in model.branches) * 4 / 2**20
        bank_sizes = [len(b.bank) for b in model.branches]
    bb = (backbone_ms + backbone_again) / 2
    return {"backbone": ex.identity.name, "branches": [i.name for i in ex.branch_identities],
            "bank_sizes": bank_sizes, "weights": "random (seeded)" if random_w else "ImageNet", "resolution": res,
            "input_size": list(ex.input_size(*img.size)), "probe_size": list(img.size),
            "backbone_ms": round(bb, 2), "e2e_ms": e2e_ms, "e2e_over_backbone": round(e2e_ms / bb, 3),
            "e2e_parts_ms": res_parts, "bank_images": len(bank_imgs), "bank_size": model.branches[0].bank.rows.size,
            "bank_ram_mb": round(bank_mb, 1),
            "fit_ms_per_image": round(fit_s * 1000 / len(bank_imgs), 1),
            "fit_embed_ms_per_image": round(embed_ms / len(bank_imgs), 1),
            "fit_coreset_ms_per_image": round(coreset_ms / len(bank_imgs), 1),
            "coreset_over_embed": round(coreset_ms / embed_ms, 3), "threshold_s": round(threshold_s, 2)}


def bench_startup(n: int, imgs: list[bytes]) -> dict:
    ex = get_extractor("efficientnet_lite0", resolution=256, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = RoiModel(Path(tmp), "bench", "startup", ex, ModelSettings())
        samples = [(b, decode_image(b), {"source": "bench"}) for b in imgs[:n]]
        for i in range(0, len(samples), 32):
            model.fit_ok(samples[i : i + 32], finalize=False)
        model.finalize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = RoiModel(Path(tmp), "bench", "startup", ex, ModelSettings())
            times.append(time.perf_counter() - t0)
        assert again.manifest["counts"]["ok"] == n
        return {"startup_samples": n, "startup_s": round(statistics.median(times), 3),
                "bank_size": int(again.branches[0].bank.rows.size), "backbone": "efficientnet_lite0", "resolution": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--bank", type=int, default=200)
    ap.add_argument("--startup-samples", type=int, default=1000)
    ap.add_argument("--configs", nargs="+", default=["efficientnet_lite0:256", "efficientnet_lite0:320",
                                                      "efficientnet_lite0:448", "dinov2_vits14:224",
                                                      "dinov2_vits14:448"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    free = sorted((shared_root() / "datasets" / "magnetic_tile" / "MT_Free" / "Imgs").glob("*.jpg"))
    bank_imgs = variants(free, args.bank)
    probe = (shared_root() / "datasets" / "mvtec_3d_ad" / "tire" / "test" / "good" / "rgb" / "000.png").read_bytes()
    out = {"threads": torch.get_num_threads(), "runs": args.runs, "results": []}
    for cfg in args.configs:
        name, res = cfg.split(":")
        r = bench_config(name, int(res), name.startswith("dinov2"), bank_imgs, probe, args.runs)
        print(json.dumps(r), file=sys.stderr)
        out["results"].append(r)
    if args.startup_samples:
        out["startup"] = bench_startup(args.startup_samples, variants(free, args.startup_samples))
        print(json.dumps(out["startup"]), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
