"""Hostile and malformed uploads through nginx: each gets a JSON 4xx, and none leaves a trace.

Every input is generated here, in memory (no binary fixtures). After each one: both instances still
answer /ready 200; no file the request created stays open in an instance or in nginx (werkzeug spools
uploads over 500 KB to an unlinked TemporaryFile, so a leak shows only as a '(deleted)' entry in
/proc/<pid>/fd, never in a directory listing); the instances' temporary directory and the run directory
hold the same files as before. Then 1000 bad requests, sent concurrently, must not grow any instance's
memory by 10 %, and no name taken from an upload's filename may appear on disk.

The instances run with TMPDIR set to a directory of this test's own: /tmp is shared with whatever else
runs on the host, so only a private directory can be compared file for file (in production systemd's
PrivateTmp= gives each service the same isolation). /tmp itself is searched for the filename marker.
"""
from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import socket
import struct
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import requests

from support import bring_up, encode, wav_bytes

pytestmark = pytest.mark.integration

MAX_AUDIO_SECONDS = 60
# In every filename we send, so that the filesystem can be searched for anything named after one.
MARK = f"hostile{uuid.uuid4().hex[:10]}"
REQUEST_TIMEOUT = 30  # a bad request is refused in milliseconds; anything near this is a hang


# -- inputs ------------------------------------------------------------------------------------------

def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None], channels, axis=1)


def _wav_header(rate: int, channels: int, data_len: int, bits: int = 16, fmt_tag: int = 1) -> bytes:
    """A canonical 44-byte WAV header that says whatever it is told, however absurd."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    return (b"RIFF" + struct.pack("<I", (4 + 8 + len(fmt) + 8 + data_len) & 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_len & 0xFFFFFFFF))


def _video_only(container: str, codec: str) -> bytes:
    """A real video file with no audio stream, encoded by FFmpeg through PyAV."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mjpeg") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pixels = b"".join(b"\x00" + bytes(3 * 8) for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def _archives(payload: bytes) -> dict[str, bytes]:
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("clip.wav", payload)
    t = io.BytesIO()
    with tarfile.open(fileobj=t, mode="w") as tf:
        info = tarfile.TarInfo("clip.wav")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return {"zip": z.getvalue(), "gzip": gzip.compress(payload), "tar": t.getvalue()}


def _multipart(parts: list[tuple[bytes, bytes, bytes]], boundary: bytes = b"hostileBOUNDARY") -> tuple[bytes, str]:
    """A multipart body built byte by byte: (field name, raw filename bytes, content) per part."""
    body = b"".join(
        b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"; filename=\"" + filename
        + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
        for name, filename, content in parts)
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


@dataclass
class Case:
    """One hostile request: ``kwargs`` for requests.post (``chunks``: a body sent chunked), or ``raw``
    bytes written to the socket as they are."""

    status: int
    code: str | None          # None: any code, as long as the answer is a JSON error
    kwargs: dict = field(default_factory=dict)
    raw: bytes | None = None
    chunks: list[bytes] | None = None


def _file(name: str, data: bytes, ext: str = "wav", status: int = 422, code: str | None = None) -> Case:
    return Case(status, code, {"files": {"audio": (f"{MARK}-{name}.{ext}", data)}})


def _cases() -> dict[str, Case]:
    wav = wav_bytes(_tone(1.0, 16000), 16000)
    flac = encode(_tone(1.0, 16000), 16000, "flac", "flac")
    mp3 = encode(_tone(1.0, 44100), 44100, "mp3", "libmp3lame")
    ogg = encode(_tone(1.0, 48000), 48000, "ogg", "libopus")
    text = b"this is a text file, not a wav\n" * 20

    # A FLAC stream whose STREAMINFO declares three hours (total samples: low 36 bits at bytes 13..17).
    flac_hours = bytearray(flac)
    at = flac_hours.index(b"fLaC") + 8 + 13
    total = (3 * 3600 * 16000).to_bytes(5, "big")
    flac_hours[at] = (flac_hours[at] & 0xF0) | total[0]
    flac_hours[at + 1:at + 5] = total[1:]
    # A fmt chunk whose size field claims 4 GB.
    fmt_size_lie = bytearray(wav)
    fmt_size_lie[16:20] = struct.pack("<I", 0xFFFFFFF0)

    undecodable, too_short, not_audio = "undecodable_audio", "audio_too_short", "unsupported_media_type"
    cases = {
        "text file named .wav": _file("text", text, status=415, code=not_audio),
        "empty file": _file("empty", b"", status=400, code="empty_audio"),
        # Truncated files, cut inside the header, right after it and part way through the data.
        "wav cut at 4 bytes": _file("wav4", wav[:4], status=415, code=not_audio),  # too short to tell
        "wav cut at 30 bytes": _file("wav30", wav[:30], code=undecodable),
        "wav cut after the header": _file("wav44", wav[:44], code=too_short),
        "wav cut inside the first sample": _file("wav47", wav[:47], code=too_short),
        "flac cut at 4 bytes": _file("flac4", flac[:4], "flac", code=undecodable),
        "flac cut inside STREAMINFO": _file("flac30", flac[:30], "flac", code=undecodable),
        "flac cut mid-stream": _file("flac3", flac[:len(flac) // 3], "flac", code=undecodable),
        "mp3 cut at 12 bytes": _file("mp312", mp3[:12], "mp3", code=undecodable),
        "mp3 cut mid-stream": _file("mp33", mp3[:len(mp3) // 3], "mp3"),  # truncated_audio from the Xing header
        "ogg cut at 30 bytes": _file("ogg30", ogg[:30], "ogg", code=undecodable),
        "ogg cut mid-stream": _file("ogg3", ogg[:len(ogg) // 3], "ogg", code=undecodable),
        # Headers that lie.
        "wav header claiming 3 hours": _file("wavhours", _wav_header(16000, 1, 2 * 3 * 3600 * 16000) + bytes(320),
                                             code=too_short),
        "flac header claiming 3 hours": _file("flachours", bytes(flac_hours), "flac", status=413,
                                              code="audio_too_long"),
        "zero samples": _file("zero", _wav_header(16000, 1, 0), code=too_short),
        "one sample": _file("one", wav_bytes(np.zeros(1, np.float32), 16000), code=too_short),
        "NaN float wav": _file("nan", wav_bytes(np.full(16000, np.nan, np.float32), 16000, "FLOAT"),
                               code="invalid_samples"),
        "inf float wav": _file("inf", wav_bytes(np.where(np.arange(16000) % 2, np.inf, -np.inf).astype(np.float32),
                                                16000, "FLOAT"), code="invalid_samples"),
        "sample rate 1 Hz": _file("rate1", _wav_header(1, 1, 20) + bytes(20), code="unsupported_sample_rate"),
        "sample rate 1 MHz": _file("rate1m", _wav_header(1_000_000, 1, 400_000) + bytes(400_000),
                                   code="unsupported_sample_rate"),
        "sample rate 0": _file("rate0", _wav_header(0, 1, 3200) + bytes(3200), code=undecodable),
        "64 channels": _file("ch64", _wav_header(16000, 64, 2 * 64 * 1600) + bytes(2 * 64 * 1600),
                             code="unsupported_channels"),
        "0 channels": _file("ch0", _wav_header(16000, 0, 3200) + bytes(3200), code="unsupported_channels"),
        "wav with a bogus fmt format tag": _file("fmttag", _wav_header(16000, 1, 3200, fmt_tag=0xBEEF) + bytes(3200),
                                                 status=415, code=not_audio),
        "wav with a fmt chunk size lie": _file("fmtsize", bytes(fmt_size_lie), code=undecodable),
        **{f"{kind} archive": _file(kind, data, kind, status=415, code=not_audio)
           for kind, data in _archives(wav).items()},
        "png image": _file("png", _png(), "png", status=415, code=not_audio),
        "jpeg image": _file("jpeg", _jpeg(), "jpg", status=415, code=not_audio),
        "pdf document": _file("pdf", b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages"
                                     b"/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n", "pdf",
                              status=415, code=not_audio),
        "html page": _file("html", b"<!DOCTYPE html><html><head><title>x</title></head><body><p>not audio</p>"
                                   b"</body></html>\n" * 5, "html", status=415, code=not_audio),
        # Seeded: libsndfile finds MPEG frame syncs in these bytes and calls them damaged audio.
        "random bytes": _file("random", np.random.default_rng(1).bytes(50_000), code=undecodable),
        "all zeros": _file("zeros", bytes(50_000), status=415, code=not_audio),
        "mp4 with no audio stream": _file("mp4", _video_only("mp4", "mpeg4"), "mp4", status=415, code=not_audio),
        "video-only webm": _file("webm", _video_only("webm", "libvpx"), "webm", status=415, code=not_audio),
        # Over werkzeug's 500 KB spooling threshold and nginx's 1 MB body buffer: both write temp files.
        "1.6 MB of non-audio": _file("big", b"\x01\x02" * 800_000, "bin", status=415, code=not_audio),
        "1.2 MB 64-channel wav": _file("bigch", _wav_header(16000, 64, 1_200_000) + bytes(1_200_000),
                                       code="unsupported_channels"),
        # Form shapes.
        "multipart without a file": Case(400, "missing_audio", {"files": {"language": (None, "en")}}),
        "multipart with the file in an unknown field": Case(400, "missing_audio",
                                                            {"files": {"other": (f"{MARK}-x.wav", wav)}}),
        "multipart with two files": Case(400, "multiple_files", {"files": [
            ("audio", (f"{MARK}-a.wav", wav)), ("file", (f"{MARK}-b.wav", wav))]}),
        "multipart without a boundary": Case(400, "missing_audio", {
            "data": text, "headers": {"Content-Type": "multipart/form-data"}}),
        "multipart body that is not multipart": Case(400, "missing_audio", {
            "data": text, "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}),
        # Filenames: never used, so they cannot reach the filesystem (checked at the end).
        "path traversal filename": Case(415, not_audio, {"files": {"audio": ("../../etc/passwd", text)}}),
        "path traversal filename into /tmp": Case(415, not_audio, {
            "files": {"audio": (f"../../../../tmp/{MARK}-traversal.wav", text)}}),
        "NUL in the filename": Case(415, not_audio, {"files": {"audio": (f"{MARK}-a\x00b.wav", text)}}),
        "5000-character filename": Case(415, not_audio, {"files": {"audio": (f"{MARK}-" + "x" * 5000 + ".wav", text)}}),
        "newlines in the filename": Case(415, not_audio, {
            "files": {"audio": (f"{MARK}-a\nb\r\nContent-Type: text/html\r\n.wav", text)}}),
        # werkzeug drops a part whose headers are not UTF-8 (its multipart parser fails silently).
        "non-UTF-8 filename": Case(400, "missing_audio", dict(zip(("data", "headers"), _raw_multipart_non_utf8(text)))),
        # Raw bodies and content types.
        "empty raw body as audio/wav": Case(400, "empty_audio", {"data": b"", "headers": {"Content-Type": "audio/wav"}}),
        "html as audio/wav": Case(415, not_audio, {"data": b"<html></html>\n" * 10,
                                                   "headers": {"Content-Type": "audio/wav"}}),
        "wav as text/plain": Case(415, not_audio, {"data": wav, "headers": {"Content-Type": "text/plain"}}),
        "wav as image/png": Case(415, not_audio, {"data": wav, "headers": {"Content-Type": "image/png"}}),
        "json body": Case(415, not_audio, {"json": {"audio": "UklGRg=="}}),
        "url-encoded form": Case(415, not_audio, {"data": {"audio": "x"}}),
        "raw body without a Content-Type": Case(415, not_audio, {"data": wav, "headers": {"Content-Type": ""}}),
        "chunked raw body of garbage": Case(415, not_audio, {"headers": {"Content-Type": "audio/wav"}},
                                            chunks=[b"garbage", b" and more garbage" * 10]),
        # nginx refuses from the header alone, without waiting for a body that will never come.
        "Content-Length of 1 TB": Case(413, "payload_too_large", raw=(
            b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 1000000000000\r\n\r\nRIFF")),
    }
    return cases


def _raw_multipart_non_utf8(content: bytes) -> tuple[bytes, dict]:
    body, content_type = _multipart([(b"audio", MARK.encode() + b"-caf\xe9\xff\xfe.wav", content)])
    return body, {"Content-Type": content_type}


CASES = _cases()


# -- the service and what to watch in it -------------------------------------------------------------

@dataclass
class Watched:
    """The running service and its processes, found once through ``asrctl status --json``."""

    svc: object
    instance_tmp: Path
    instances: dict[str, list[int]] = field(default_factory=dict)  # name -> gunicorn master + worker
    nginx: list[int] = field(default_factory=list)                  # master + workers
    started: dict[int, str] = field(default_factory=dict)           # pid -> start time (/proc/<pid>/stat)
    passwd: tuple = ()                                              # /etc/passwd's size and mtime at start
    # Files open at start. gunicorn's heartbeat file (wgunicorn-*, in TMPDIR) is one: unlinked at
    # once and held open by master and worker for the worker's life, by design.
    files: set = field(default_factory=set)

    def find_processes(self) -> None:
        rows = json.loads(self.svc.asrctl("status", "--json").stdout)["instances"]
        self.instances = {r["name"]: [r["pid"], *_children(r["pid"])] for r in rows if r["name"].startswith("asr-")}
        self.nginx = [p for r in rows if r["name"] == "nginx" for p in (r["pid"], *_children(r["pid"]))]
        self.started = {pid: _start_time(pid) for pid in self.pids()}
        self.files = _open_files(self.pids())

    def pids(self) -> list[int]:
        return [p for group in self.instances.values() for p in group] + self.nginx

    def same_processes(self) -> bool:
        """No instance (master or worker) and no nginx process has died or been replaced."""
        return all(_start_time(pid) == t for pid, t in self.started.items())


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return "gone"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


_FD_KINDS = ("socket:", "pipe:", "anon_inode:", "/dev/")


def _open_files(pids: list[int]) -> set[tuple[int, str]]:
    """(pid, target) of every open file that is not a socket, pipe, event fd or device."""
    files = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith(_FD_KINDS):
                files.add((pid, target))
    return files


SQLITE_TRANSIENT = ("-wal", "-shm", "-journal")


def _tree(root: Path, skip_logs: bool = False) -> set[str]:
    paths = set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if skip_logs and rel.startswith("logs" + os.sep):
                continue  # the same log files keep growing; a new one would be a rotation
            if name.endswith(SQLITE_TRANSIENT):
                continue  # SQLite's own: there while any process has the job store open, gone when it closes
            paths.add(rel)
    return paths


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    instance_tmp = tmp / "instance-tmp"
    instance_tmp.mkdir()
    svc = bring_up(tmp, 2, "--max-audio-seconds", str(MAX_AUDIO_SECONDS), env={"TMPDIR": str(instance_tmp)})
    try:
        w = Watched(svc, instance_tmp, passwd=_stat("/etc/passwd"))
        w.find_processes()
        assert len(w.instances) == 2 and all(len(p) == 2 for p in w.instances.values()) and len(w.nginx) >= 2
        for name, pids in w.instances.items():
            environ = Path(f"/proc/{pids[-1]}/environ").read_bytes().split(b"\0")
            assert f"TMPDIR={instance_tmp}".encode() in environ, f"{name} does not use the test's TMPDIR"
        yield w
    finally:
        svc.asrctl("down", check=False)


def send(url: str, case: Case, session: requests.Session | None = None) -> tuple[int, dict, str]:
    """Status, headers and body text of one hostile request, bounded in time."""
    if case.raw is not None:
        host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(case.raw)
            response = http.client.HTTPResponse(sock)
            response.begin()  # reads by Content-Length: does not wait for nginx's lingering close
            return response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace")
    kwargs = dict(case.kwargs)
    if case.chunks is not None:
        kwargs["data"] = iter(case.chunks)  # a generator body: requests sends it chunked
    response = (session or requests).post(f"{url}/asr", timeout=REQUEST_TIMEOUT, **kwargs)
    return response.status_code, dict(response.headers), response.text


def _body_size(case: Case) -> int:
    files = case.kwargs.get("files") or {}
    parts = files.values() if isinstance(files, dict) else [part for _, part in files]
    data = case.kwargs.get("data")
    return sum(len(p[1] or b"") for p in parts) + (len(data) if isinstance(data, bytes) else 0)


def _wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# -- each input on its own ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gets_a_json_4xx_and_leaves_nothing_behind(watched, name):
    case = CASES[name]
    pids = watched.pids()
    files_before = _open_files(pids)
    run_before = _tree(watched.svc.run_dir, skip_logs=True)

    started = time.monotonic()
    status, headers, text = send(watched.svc.url, case)
    assert time.monotonic() - started < REQUEST_TIMEOUT
    assert status == case.status, text
    assert headers.get("Content-Type", "").startswith("application/json"), (headers, text)
    error = json.loads(text)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    assert case.code is None or error["code"] == case.code, error

    for port in watched.svc.instance_ports:
        assert watched.svc.instance_ready(port) == 200
    # The upload's spool file (werkzeug), its nginx body buffer and anything else the request opened
    # are closed and gone once the answer is out.
    assert watched.same_processes(), "an instance or nginx process died or restarted"
    assert _wait_for(lambda: _open_files(pids) <= files_before), _open_files(pids) - files_before
    assert not any("(deleted)" in target for _, target in _open_files(pids) - files_before)
    assert _wait_for(lambda: not any(watched.instance_tmp.iterdir())), list(watched.instance_tmp.iterdir())
    assert _wait_for(lambda: _tree(watched.svc.run_dir, skip_logs=True) == run_before), \
        _tree(watched.svc.run_dir, skip_logs=True) ^ run_before


@pytest.mark.parametrize("raw", [
    b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: -5\r\n\r\nabc",
    b"POST /asr HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["negative Content-Length", "bad chunk size", "garbage request line", "URI too long"])
def test_requests_nginx_cannot_parse_get_a_json_400(watched, raw):
    status, headers, text = send(watched.svc.url, Case(400, None, raw=raw))
    assert status in (400, 414)
    assert headers.get("Content-Type", "").startswith("application/json"), text
    assert json.loads(text)["error"]["message"]


# -- many of them ------------------------------------------------------------------------------------

def test_a_thousand_bad_requests_do_not_grow_memory(watched):
    # Small and large, multipart and raw; the raw-socket case is left to its own test above.
    mix = [c for c in CASES.values() if c.raw is None]
    large = [c for c in mix if _body_size(c) > 500_000]
    local = threading.local()

    def burst(cases: list[Case], count: int, threads: int, deadline_s: float) -> list[int]:
        def one(i: int) -> int:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            return send(watched.svc.url, cases[i % len(cases)], local.session)[0]

        deadline = time.monotonic() + deadline_s
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(one, i) for i in range(count)]
            return [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]

    # Warm-up, not counted. glibc gives each gunicorn thread its own malloc arena, and once the first
    # large upload is freed it raises its mmap threshold, so later large bodies come from the arenas:
    # RSS climbs until every thread that serves requests has held a large one, then stays flat
    # (measured: +25-40 MB over the first few hundred mixed requests, then about 1 % per thousand).
    # gthread only starts a thread when none is idle, so large uploads from more clients than the
    # burst below uses (but no more than nginx's max_conns lets through: max_queue + max_streams each) warm every
    # thread it will touch; then every input once or more.
    assert len(large) >= 2
    warm = burst(large, 96, 12, 30) + burst(mix, max(100, len(mix)), 4, 30)
    assert all(s in (400, 413, 415, 422) for s in warm), sorted(set(warm))
    pids = watched.instances
    before = {name: _rss_kib(p) for name, p in pids.items()}

    started = time.monotonic()
    statuses = burst(mix, 1000, 4, 60)
    elapsed = time.monotonic() - started
    assert all(s in (400, 413, 415, 422) for s in statuses), sorted(set(statuses))

    assert watched.same_processes(), "an instance or nginx process died or restarted under bad requests"
    after = {name: _rss_kib(p) for name, p in pids.items()}
    print(f"1000 bad requests in {elapsed:.1f} s; RSS KiB before -> after:",
          {name: (before[name], after[name]) for name in pids})
    for name in pids:
        assert after[name] < before[name] * 1.10, \
            f"{name}: RSS {before[name]} KiB -> {after[name]} KiB after 1000 bad requests ({elapsed:.1f} s)"
    for port in watched.svc.instance_ports:
        assert watched.svc.instance_ready(port) == 200
    assert not any(watched.instance_tmp.iterdir())
    assert _wait_for(lambda: _open_files(watched.pids()) <= watched.files), _open_files(watched.pids()) - watched.files


# -- last: nothing named after an upload exists anywhere ---------------------------------------------

def test_no_filename_reaches_the_filesystem(watched):
    found = []
    for root in {Path(tempfile.gettempdir()), Path("/tmp"), watched.svc.run_dir, watched.instance_tmp}:
        for dirpath, dirs, names in os.walk(root):
            found += [os.path.join(dirpath, n) for n in [*dirs, *names] if MARK in n]
    assert not found
    # The traversal names in the requests, had they been joined to any directory, would have landed here.
    assert not Path("/tmp", f"{MARK}-traversal.wav").exists()
    assert _stat("/etc/passwd") == watched.passwd
    # Nor inside the log files as a path: only nginx's request line may name /asr.
    assert not any(MARK in p.read_text(errors="replace") for p in (watched.svc.run_dir / "logs").glob("*.log"))
    # And after everything, supervisord still sees every program running, every instance ready.
    rows = json.loads(watched.svc.asrctl("status", "--json").stdout)["instances"]
    assert all(r["state"] == "RUNNING" and r["ready"] for r in rows), rows
    assert watched.same_processes()
