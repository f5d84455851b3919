"""Hostile ROI archives (issue 23), made by hand from a real export: each is refused with a reason before
anything is written (nothing left under the data root), memory stays bounded while a big member streams,
and the agent still starts and serves afterwards. Through core, the CLI and HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from core.errors import AnomalyError
from core.image_io import decode_image
from core.roi.archive import export_roi
from core.roi.importer import ImportLimits, import_roi
from tests.agent_proc import Agent
from tests.broker import free_port
from tests.conftest import AGENT_ENV_KEYS


def _members(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _pack(members: list[tuple[str, bytes]], relist: bool = True, extra_listed: dict | None = None) -> bytes:
    """A tar.gz of the members; relist: export.json's hashes made to match (the archive is self-consistent)."""
    meta = json.loads(dict(members)["export.json"])
    if relist:
        meta["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in members if n != "export.json"}
    meta["files"].update(extra_listed or {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in [("export.json", json.dumps(meta).encode()), *[(n, d) for n, d in members
                                                                         if n != "export.json"]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_manifest(members: list[tuple[str, bytes]], edit) -> list[tuple[str, bytes]]:
    out = []
    for name, data in members:
        if name == "manifest.json":
            m = json.loads(data)
            edit(m)
            data = json.dumps(m).encode()
        out.append((name, data))
    return out


def _undecodable(ms: list[tuple[str, bytes]], sample_json: str) -> list[tuple[str, bytes]]:
    """One sample whose image is garbage and whose JSON names that garbage's true hash."""
    meta = json.loads(dict(ms)[sample_json])
    junk = b"not an image at all" * 10
    image = f"samples/ok/{meta['image_file']}"
    meta["sha256"] = hashlib.sha256(junk).hexdigest()
    return [(n, junk if n == image else json.dumps(meta).encode() if n == sample_json else d) for n, d in ms]


@pytest.fixture(scope="module")
def exported(fitted_template: Path) -> bytes:
    return export_roi(fitted_template, "st1", "tire")


def _identity(archive: bytes) -> tuple[dict, list[dict]]:
    meta = json.loads(dict(_members(archive))["export.json"])
    return meta["backbone"], meta["branches"]


def _crafted(exported: bytes) -> dict[str, bytes]:
    ms = _members(exported)
    sample_json = next(n for n, _ in ms if n.startswith("samples/ok/") and n.endswith(".json"))
    return {
        "no_threshold": _pack(_with_manifest(ms, lambda m: m.pop("threshold"))),
        "threshold_without_method": _pack(_with_manifest(ms, lambda m: m["threshold"].pop("method"))),
        "version_abc": _pack(_with_manifest(ms, lambda m: m.update(version="abc"))),
        "threshold_nan": _pack(_with_manifest(ms, lambda m: m["threshold"].update(value=math.nan))),
        "sample_json_not_json": _pack([(n, b"{not json" if n == sample_json else d) for n, d in ms]),
        "orphan_image": _pack([*ms, ("samples/ok/extra.png", b"\x89PNG not really")]),
        "image_not_its_sample": _pack(
            [(n, b"garbage" if n.startswith("samples/ok/") and n.endswith(".png") else d) for n, d in ms]),
        "image_undecodable": _pack(_undecodable(ms, sample_json)),
        "dotdot_listed": _pack([*ms, ("../evil.json", b"{}")]),  # listed with its hash: the name rule refuses it
        "unlisted": _pack([*ms, ("samples/ok/unlisted.json", b"{}")], relist=False),
        "too_many_files": _pack(ms, extra_listed={f"samples/ng/x{i}.json": "0" * 64 for i in range(20_001)}),
        "big_bank": b"",  # made by the test that streams it
    }


CODES = {"no_threshold": "threshold", "threshold_without_method": "method", "version_abc": "version",
         "threshold_nan": "finite",
         "sample_json_not_json": "not JSON", "orphan_image": "belongs to no sample",
         "image_not_its_sample": "sha256", "image_undecodable": "unknown_format",
         "dotdot_listed": "export.json is not valid",
         "unlisted": "does not list", "too_many_files": "import_max_files"}


def test_each_crafted_archive_is_refused_with_a_reason_and_leaves_nothing(tmp_path: Path, exported: bytes) -> None:
    ident, branches = _identity(exported)
    target = tmp_path / "station2"
    for name, archive in _crafted(exported).items():
        if not archive:
            continue
        with pytest.raises(AnomalyError) as err:
            import_roi(target, archive, ident, branches, check_image=decode_image)
        assert err.value.code == "invalid_archive", (name, err.value.code, err.value.message)
        assert CODES[name] in err.value.message, (name, err.value.message)
        assert not [p for p in target.rglob("*")], (name, list(target.rglob("*"))[:5])
    # the real export itself imports, and a second one past limits.max_rois is refused
    got = import_roi(target, exported, ident, branches, limits=ImportLimits(max_rois=1))
    assert got["role_id"] == "st1" and got["samples"]["ok"] == 6
    with pytest.raises(AnomalyError) as err:
        import_roi(target, exported, ident, branches, "st1", "other", limits=ImportLimits(max_rois=1))
    assert err.value.code == "too_many_rois"
    assert sorted(p.name for p in (target / "models" / "st1").iterdir()) == ["tire"]


BIG = 200 << 20

STREAM_CHECK = """
import json, resource, sys
from pathlib import Path
from core.roi.importer import import_roi
from core.errors import AnomalyError
from core.image_io import decode_image
ident, branches = json.loads(sys.argv[3]), json.loads(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    import_roi(Path(sys.argv[1]), Path(sys.argv[2]), ident, branches)
    code = "imported"
except AnomalyError as exc:
    code = exc.code + ": " + exc.message
print(json.dumps({"code": code, "base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _import_in_subprocess(target: Path, path: Path, ident: dict, branches: list[dict]) -> dict:
    """The real import of `path` into `target` in a fresh process: its outcome and peak RSS (STREAM_CHECK)."""
    r = subprocess.run([sys.executable, "-c", STREAM_CHECK, str(target), str(path), json.dumps(ident),
                        json.dumps(branches)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_a_big_member_streams_to_disk_with_bounded_memory_and_is_refused(tmp_path: Path, exported: bytes) -> None:
    """A 200 MiB zero 'bank' listed with its true hash: streamed (never held), then refused as not a bank."""
    ms = _members(exported)
    meta = json.loads(dict(ms)["export.json"])
    zero_sha = hashlib.sha256()
    chunk = bytes(1 << 20)
    for _ in range(BIG >> 20):
        zero_sha.update(chunk)
    meta["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in ms if n != "export.json"}
    meta["files"]["b1-bank.npz"] = zero_sha.hexdigest()
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, mode="w:gz", compresslevel=1) as tar:
        for name, data in [("export.json", json.dumps(meta).encode()), *[(n, d) for n, d in ms if n != "export.json"
                                                                         and n != "b1-bank.npz"]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("b1-bank.npz")
        info.size = BIG
        tar.addfile(info, io.BufferedReader(_Zeros(BIG)))
    assert path.stat().st_size < 8 << 20  # a small upload (the real samples and 1 MiB of gzip) unpacks to 200 MiB
    ident, branches = _identity(exported)
    target = tmp_path / "station2"
    out = _import_in_subprocess(target, path, ident, branches)
    assert out["code"].startswith("invalid_archive: b1-bank.npz is not a bank"), out
    grown_mb = (out["peak_kb"] - out["base_kb"]) / 1024
    assert grown_mb < 64, out  # the member is 200 MiB: it went to disk in 1 MiB chunks, never into memory
    assert not list(target.rglob("*")), "the staging folder is removed"


def test_a_refused_import_over_http_and_the_cli_leaves_the_agent_starting(tmp_path: Path, exported: bytes,
                                                                         data_root: Path) -> None:
    crafted = _crafted(exported)
    bad = tmp_path / "no_threshold.tar.gz"
    bad.write_bytes(crafted["no_threshold"])
    env = {**os.environ, **AGENT_ENV_KEYS}
    cli = [sys.executable, "-m", "agent.cli", "--data-root", str(data_root), "--log-level", "WARNING"]
    r = subprocess.run([*cli, "import", "--role", "st2", "--roi", "x", str(bad)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "invalid_archive" in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
    port = free_port()
    agent = Agent(data_root, http_port=port).start()
    try:
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            for name in ("no_threshold", "threshold_nan", "version_abc", "orphan_image"):
                r = c.post("/import", data={"role_id": "st2", "roi_id": name},
                           files=[("file", ("a.tar.gz", crafted[name], "application/gzip"))])
                assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_archive", (name, r.text)
            r = c.post("/import", files=[("file", ("a.tar.gz", b"{malformed", "application/gzip"))])
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_archive"
            assert [s["roi_id"] for s in c.get("/models").json()] == ["tire"]
            assert c.get("/health").json()["status"] == "online"
        assert agent.sigterm() == 0
        assert not (data_root / "models" / "st2").exists() and not (data_root / "tmp").exists()
        agent = Agent(data_root, http_port=port).start()  # and it starts again
        assert agent.alive()
        assert agent.sigterm() == 0
    finally:
        agent.cleanup()
    r = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and [json.loads(x)["roi_id"] for x in r.stdout.splitlines()] == ["tire"]


def _pax_bomb(path: Path, export_json: bytes, comment_bytes: int) -> None:
    """A tar.gz whose first member carries a pax header with a `comment` of comment_bytes, written in 1 MiB
    chunks (never held here): tarfile itself would read that header whole into memory."""
    import gzip

    body = comment_bytes + len(b"comment=\n")
    length = body + 1
    while len(str(length)) + 1 + body != length:
        length = len(str(length)) + 1 + body
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, length
    member = tarfile.TarInfo("export.json")
    member.size = len(export_json)
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(pax.tobuf(tarfile.USTAR_FORMAT))
        out.write(f"{length} comment=".encode())
        chunk = b"a" * (1 << 20)
        left = comment_bytes
        while left:
            out.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        out.write(b"\n" + bytes(-length % tarfile.BLOCKSIZE))
        out.write(member.tobuf(tarfile.USTAR_FORMAT) + export_json + bytes(-len(export_json) % tarfile.BLOCKSIZE))
        out.write(bytes(2 * tarfile.BLOCKSIZE))


def test_a_300_mib_pax_header_is_refused_before_it_is_read(tmp_path: Path, exported: bytes) -> None:
    """Issue 33 item 5: tarfile reads a pax header whole, counted by no limit (an 8 MB upload with a 400 MB
    comment cost 1.2 GB). It is refused from its size before a byte of it is held; peak RSS measured in a
    subprocess that runs the real import."""
    path = tmp_path / "pax.tar.gz"
    _pax_bomb(path, dict(_members(exported))["export.json"], 300 << 20)
    assert path.stat().st_size < 4 << 20  # a small upload
    ident, branches = _identity(exported)
    target = tmp_path / "station2"
    out = _import_in_subprocess(target, path, ident, branches)
    assert out["code"].startswith("invalid_archive: the archive has an extended header"), out
    grown_mb = (out["peak_kb"] - out["base_kb"]) / 1024
    assert grown_mb < 32, out
    assert not list(target.rglob("*")), "nothing is left"


def test_header_bytes_count_against_the_unpacked_limit(tmp_path: Path, exported: bytes) -> None:
    """Many small pax headers (each under the per-header bound) still count: the archive's headers are
    part of what it unpacks to."""
    ms = _members(exported)
    meta = json.loads(dict(ms)["export.json"])
    meta["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in ms if n != "export.json"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("export.json", json.dumps(meta).encode()), *[(n, d) for n, d in ms if n != "export.json"]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "x" * 60_000}
            tar.addfile(info, io.BytesIO(data))
    ident, branches = _identity(exported)
    unpacked = sum(len(d) for _, d in ms)
    limits = ImportLimits(max_unpacked_bytes=unpacked + 30_000)  # room for the files, not for the headers
    with pytest.raises(AnomalyError, match="unpacks to more than limits.import_max_mb"):
        import_roi(tmp_path / "station2", buf.getvalue(), ident, branches, limits=limits)
    limits = ImportLimits(max_unpacked_bytes=unpacked + 60_500 * (len(ms) + 1))
    assert import_roi(tmp_path / "station3", buf.getvalue(), ident, branches, limits=limits)["roi_id"] == "tire"
