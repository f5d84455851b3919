"""A ROI's stored samples as the model sees them: de-duplicated by content, refused before anything is
written when the disk cannot hold them, decoded again for re-indexing, quarantined when unreadable."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from core.errors import AnomalyError, StorageError
from core.image_io import ImageInput, decode_image
from core.storage import RoiStore, SampleRecord

Sample = tuple[bytes, ImageInput, dict]  # raw bytes, decoded image, metadata (source, request_id)


@dataclass
class Stored:
    """What one store call did: the new records (and their images), and each input's outcome in order."""

    records: list[SampleRecord] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # sample ids already stored
    outcomes: list[tuple[str, bool]] = field(default_factory=list)  # (sample_id, stored now) per input

    def report(self) -> dict:
        return {"added": [r.sample_id for r in self.records], "duplicates": self.duplicates,
                "stored": [new for _, new in self.outcomes], "ids": [sid for sid, _ in self.outcomes]}


class SampleStore:
    """Samples of one ROI on disk (image + JSON), through `RoiStore`. This model is their only writer."""

    def __init__(self, store: RoiStore, bytes_needed: Callable[[list[Sample]], int],
                 progress: Callable[[], None]) -> None:
        self.store = store
        self._bytes_needed = bytes_needed  # the index rows and bank rewrite a fit adds, besides the images
        self.progress = progress
        self._known: dict[str, dict[str, str]] = {}  # kind -> sha256 -> sample_id
        self.draft_for: Callable[[int, int], tuple[int, int]] | None = None  # the backbone input: decode as intake

    def check_space(self, samples: list[Sample]) -> None:
        """Refuse before writing anything when the data root cannot hold the images, their index rows,
        the rewritten bank and manifest, and 1 MB to spare (disk_full)."""
        self.store.root.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.store.root.parent).free
        need = sum(len(d) for d, _, _ in samples) + self._bytes_needed(samples) + (1 << 20)
        if free < need:
            raise StorageError(f"the data root has {free // 1024} KiB free; storing these {len(samples)} samples needs "
                               f"about {need // 1024} KiB: nothing was stored", code="disk_full")

    def add(self, kind: str, samples: list[Sample]) -> Stored:
        """Store what is new (by SHA-256 of the bytes); an image already stored is reported, not stored."""
        self.check_space(samples)
        known = self.known(kind)
        out = Stored()
        for data, img, meta in samples:
            self.progress()  # each sample is written and fsynced: a long upload must not look hung
            sha = hashlib.sha256(data).hexdigest()
            if sha in known:
                out.duplicates.append(known[sha])
                out.outcomes.append((known[sha], False))
                continue
            rec = self.store.save_sample(kind, data, img.format, {"mm_per_px": img.mm_per_px, **meta}, sha=sha)
            known[sha] = rec.sample_id
            out.outcomes.append((rec.sample_id, True))
            out.records.append(rec)
            out.images.append(img)
        return out

    def known(self, kind: str) -> dict[str, str]:
        """sha256 -> sample_id of the stored samples of one kind, read once (this store is their only writer;
        a delete or rollback reopens the model, and with it this cache)."""
        if kind not in self._known:
            self._known[kind] = self.store.known_hashes(kind)
        return self._known[kind]

    def readable(self, kind: str) -> list[SampleRecord]:
        """Stored samples, with the unreadable ones (corrupt JSON or image, image gone) quarantined."""
        for meta_path in self.store.unreadable_samples(kind):
            self.store.quarantine(kind, meta_path.stem, "sample JSON unreadable or its image missing")
        return self.store.list_samples(kind)

    def decodable(self, kind: str, records: list[SampleRecord]) -> tuple[list[SampleRecord], list[ImageInput]]:
        """The records whose image still decodes, and the images; the others are quarantined."""
        good, images = [], []
        for rec in records:
            try:
                images.append(decode_record(rec, self.draft_for))
                good.append(rec)
            except (AnomalyError, OSError) as exc:
                self.store.quarantine(kind, rec.sample_id, f"image cannot be decoded: {exc}")
        return good, images


def decode_record(rec: SampleRecord, draft_for: Callable[[int, int], tuple[int, int]] | None = None) -> ImageInput:
    """A stored sample's image (accepted once: no intake limits apply again), decoded as at intake."""
    return decode_image(rec.image_path.read_bytes(), mm_per_px=rec.meta.get("mm_per_px"), max_bytes=1 << 62,
                        max_decode_pixels=1 << 62, max_decoded_bytes=1 << 62, draft_for=draft_for)
