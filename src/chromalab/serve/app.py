"""`chromalab serve`: a local web page to colour photos in the browser.

FastAPI + uvicorn serve one static page (static/index.html, plain JavaScript) and a small JSON API. They come
with MLflow already (its tracking server runs on them), so the page adds no dependency, no build step and no
telemetry; Gradio would bring a large second web stack for one page.

- POST /api/colorize?name=<file name>: the photo file is the request body (no multipart parsing). It is
  streamed into a private temporary folder and refused past `max_upload_mb` (HTTP 413); a file that is not
  a readable photo gets HTTP 422 with what was wrong with it, in colorize's words, and the server carries on.
- The photo is coloured exactly as `chromalab colorize` colours it (chromalab.colorize: same model choice,
  same full-resolution output, same file name and format), so the downloaded file is the one `colorize`
  would write. Previews (gray | coloured, at most 2048 px a side) come from colorize's compare sheet.
- Results live in the temporary folder until the server stops (the oldest are dropped past MAX_RESULTS or
  MAX_RESULTS_GB); the folder of a server that was killed (-9) is deleted by the next one to start.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from chromalab import colorize
from chromalab.colorize.photos import describe_unreadable
from chromalab.errors import ChromalabError, one_line, printable

STATIC = Path(__file__).parent / "static"
WORKDIR_PREFIX = "chromalab-serve-"  # + the server's process id: what a killed server left is found by it
UPLOAD_STALL_S = 60.0  # an upload that sends nothing for this long is dropped
SHUTDOWN_WAIT_S = 10.0  # Ctrl-C or SIGTERM: requests still running get this long, then the server stops
DEFAULT_MAX_UPLOAD_MB = 50.0
MAX_RESULTS = 200
MAX_RESULTS_GB = 2.0  # and this much of the temporary folder: a large photo's result is tens of MB
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
MAX_DROPPED = 100 * MAX_RESULTS  # ids remembered as dropped (then "no such result"), so memory stays bounded


def _safe_name(name: str) -> str:
    """The upload's base name, as the user knows it, less its path and any control or format character: only
    ever a download name (the response header encodes the rest)."""
    base = Path(unicodedata.normalize("NFC", name).replace("\\", "/")).name
    cleaned = "".join(c for c in base if not unicodedata.category(c).startswith("C")).strip(" .")
    return cleaned or "photo.jpg"


def create_app(colorizer, *, model_label: str, workdir: Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               image_size: int | None = None, host: str | None = None) -> FastAPI:
    """The page and its API around a loaded colorizer (colorize.load_colorizer); files go under `workdir`.
    Listening on this machine only (`host` a loopback address), it takes uploads addressed to it as such."""
    app = FastAPI(title="chromalab", docs_url=None, redoc_url=None, openapi_url=None)
    results = _Results(workdir)
    own_names = LOOPBACK_NAMES | {host} if host in LOOPBACK_NAMES else None
    model_lock = app.state.model_lock = threading.Lock()  # one photo coloured at a time: one photo's memory
    # Uploads wait their turn here, holding no worker thread: waiting in one, 40 of them held them all, and
    # the page, its downloads and /api/info waited behind them.
    turn = asyncio.Lock()

    @app.get("/api/info")
    def info() -> dict:
        return {"model": model_label, "max_upload_mb": max_upload_mb}

    @app.post("/api/colorize")
    async def colorize_upload(request: Request, name: str = "photo.jpg") -> dict:
        name = _safe_name(name)
        _check_headers(request, name, max_upload_mb, own_names)
        job_id = uuid.uuid4().hex
        folder = workdir / job_id
        await _receive(request, folder, name, max_upload_mb)
        from starlette.concurrency import run_in_threadpool

        try:
            async with turn:
                entry = await run_in_threadpool(_colour_file, colorizer, model_lock, folder, name, image_size)
        except _StoreFailed as exc:
            _remove(folder)
            raise HTTPException(507, f"{name}: coloured, but the result could not be written ({exc})") from None
        except colorize.UnreadablePhoto as exc:
            _remove(folder)
            raise HTTPException(422, f"{name}: {exc}") from None
        except Exception as exc:  # MemoryError, a bug: the server carries on, and keeps no upload it will not use
            _remove(folder)
            raise HTTPException(500, f"{name}: the server failed colouring it ({one_line(exc)})") from None
        results.add(job_id, entry)
        return {"id": job_id, "name": name, "download_name": entry["download_name"],
                "width": entry["width"], "height": entry["height"], "seconds": entry["seconds"],
                "result": f"/api/results/{job_id}/colour", "gray_preview": f"/api/results/{job_id}/gray",
                "colour_preview": f"/api/results/{job_id}/preview"}

    @app.api_route("/api/colorize", methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"])
    def colorize_wrong_method(request: Request) -> None:  # else the page's mount answers 404, as if no API were here
        raise HTTPException(405, f"{request.method} /api/colorize: POST the photo itself as the request body "
                                 "(curl --data-binary @photo.jpg …)", headers={"Allow": "POST"})

    @app.get("/api/results/{job_id}/{kind}")
    def result(job_id: str, kind: str) -> FileResponse:
        entry = results.get(job_id)
        if entry is None or kind not in ("colour", "gray", "preview"):
            raise HTTPException(404, "no such result (results are deleted when the server stops)")
        if kind == "colour":
            media = f"image/{entry['format'].lower()}"
            return FileResponse(workdir / job_id / kind, media_type=media, filename=entry["download_name"])
        return FileResponse(workdir / job_id / kind, media_type="image/jpeg")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def _check_headers(request: Request, name: str, max_upload_mb: float, own_names: set[str] | None) -> None:
    """Refuse, before reading it, an upload from another site's page (a browser sends its Origin: any page may
    post to a server on this machine), one addressed to another name (`own_names`: a page whose own name was
    made to point here, DNS rebinding), a form upload, or one that says it is over the limit."""
    addressed = urlsplit(f"//{request.headers.get('host', '')}").hostname
    if own_names is not None and addressed not in own_names:
        raise HTTPException(403, f"{name}: this server takes uploads addressed to {', '.join(sorted(own_names))} "
                                 f"only, not {printable(str(addressed))}")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, f"{name}: uploads from {printable(origin)} are refused; use the page this server "
                                 "serves")
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"{name}: send the photo itself as the request body (curl --data-binary "
                                 "@photo.jpg …), not as a form upload")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_upload_mb * 1e6:
        raise HTTPException(413, f"{name} is {_megabytes_over(int(declared), max_upload_mb)} MB; the limit is "
                                 f"{max_upload_mb:g} MB")


def _megabytes_over(n_bytes: int, limit_mb: float) -> str:
    """`n_bytes` (over the limit) in MB with the fewest decimals, at least one, that show it over `limit_mb`:
    0.501 against 0.5, where one decimal read "0.5 MB; the limit is 0.5 MB"."""
    for decimals in range(1, 7):
        shown = f"{n_bytes / 1e6:.{decimals}f}"
        if float(shown) > limit_mb:
            return shown
    return f"{n_bytes / 1e6:.6f}"


class _Results:
    """The coloured photos kept, by id: the last MAX_RESULTS, within MAX_RESULTS_GB (the newest always); asking
    for an older one says it was dropped."""

    def __init__(self, workdir: Path):
        self.workdir, self.kept, self.dropped = workdir, OrderedDict(), OrderedDict()
        self.sizes: dict[str, int] = {}

    def add(self, job_id: str, entry: dict) -> None:
        self.kept[job_id] = entry
        self.sizes[job_id] = sum(f.stat().st_size for f in (self.workdir / job_id).iterdir() if f.is_file())
        while len(self.kept) > MAX_RESULTS or (
                len(self.kept) > 1 and sum(self.sizes.values()) > MAX_RESULTS_GB * 1e9):
            oldest = self.kept.popitem(last=False)[0]
            del self.sizes[oldest]
            self.dropped[oldest] = None
            _remove(self.workdir / oldest)
        while len(self.dropped) > MAX_DROPPED:
            self.dropped.popitem(last=False)

    def get(self, job_id: str) -> dict | None:
        if job_id in self.dropped:
            raise HTTPException(410, f"this result was dropped: the server keeps its last {MAX_RESULTS}, "
                                     f"{MAX_RESULTS_GB:g} GB at most; colour the photo again")
        return self.kept.get(job_id)


async def _receive(request: Request, folder: Path, name: str, max_upload_mb: float) -> None:
    """Stream the request's body into a new `folder`/upload; refuse (and remove the folder) past the limit or
    empty, or when the server cannot store it."""
    limit = int(max_upload_mb * 1e6)
    size = 0
    try:
        folder.mkdir()
        with (folder / "upload").open("wb") as f:
            chunks = request.stream().__aiter__()
            # a body without (or with a false) Content-Length stops at its end; one that stalls, after a while
            while chunk := await asyncio.wait_for(anext(chunks, b""), UPLOAD_STALL_S):
                size += len(chunk)
                if size > limit:
                    break
                f.write(chunk)
    except ClientDisconnect:  # nobody is left to answer: just drop what came
        _remove(folder)
        raise HTTPException(400, f"{name}: the upload was cut off") from None
    except asyncio.TimeoutError:  # a client that stops sending would hold the upload (and a shutdown) for ever
        _remove(folder)
        raise HTTPException(408, f"{name}: the upload stalled (nothing for {UPLOAD_STALL_S:g} s); "
                                 "send it again") from None
    except OSError as exc:  # the server's disk (full, or its folder gone), not the photo
        _remove(folder)
        raise HTTPException(507, f"{name}: the server could not store the upload ({one_line(exc)}); "
                                 "whoever runs it should check its disk") from None
    if size > limit or size == 0:
        _remove(folder)
        raise HTTPException(413, f"{name} is over the {max_upload_mb:g} MB limit") if size else \
            HTTPException(400, f"{name}: {describe_unreadable(None, b'')}")


class _StoreFailed(Exception):
    """The server could not write a result (a full or read-only disk)."""


def _colour_file(colorizer, model_lock: threading.Lock, folder: Path, name: str, image_size: int | None) -> dict:
    """Colour `folder`/upload as `colorize` would, into `folder`/colour, gray and preview."""
    started = time.perf_counter()
    # one photo at a time from decoding to the saved results: a few huge uploads at once would each hold their
    # full-resolution planes (README, "Measured figures behind the code")
    download_name, image_format = colorize.output_name(Path(name))
    with model_lock:
        photo, coloured = colorize.colour_bytes(colorizer, (folder / "upload").read_bytes(), image_size, image_format)
        sheet = colorize.compare_sheet(photo, coloured)  # gray | coloured, each ≤ COMPARE_MAX_SIDE
        half = sheet.width // 2
        if not folder.is_dir():  # the server stopped meanwhile and deleted it: write nothing back
            raise _StoreFailed("the server is stopping")
        try:  # an OSError here is the server's (its disk), not the photo's
            colorize.save_atomic(coloured, folder / "colour", image_format, photo.exif)
            colorize.save_atomic(sheet.crop((0, 0, half, sheet.height)), folder / "gray", "JPEG")
            colorize.save_atomic(sheet.crop((half, 0, sheet.width, sheet.height)), folder / "preview", "JPEG")
        except OSError as exc:
            raise _StoreFailed(one_line(exc)) from None
    (folder / "upload").unlink()
    return {"download_name": download_name, "format": image_format, "width": coloured.width,
            "height": coloured.height, "seconds": round(time.perf_counter() - started, 3)}


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def run_serve(model: str = "gan", *, host: str = "127.0.0.1", port: int = 8000,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, models_root: Path = Path("models")) -> None:
    """Load the model (as `chromalab colorize --model` does), then serve the page until Ctrl-C."""
    import uvicorn

    colorizer = colorize.load_colorizer(model, models_root)
    listening = listen_on(host, port)  # before the banner, so that it names the port really listened on
    _remove_orphaned_workdirs()
    with listening, tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as workdir:
        app = create_app(colorizer, model_label=model, workdir=Path(workdir), max_upload_mb=max_upload_mb, host=host)
        print(f"chromalab serve: http://{host}:{listening.getsockname()[1]}  (model {model}; Ctrl-C stops)",
              file=sys.stderr)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_WAIT_S)
        try:
            uvicorn.Server(config).run(sockets=[listening])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it shut down on: a server's normal end
            pass
        with app.state.model_lock:  # a photo still being coloured (its request cut off) is written, then deleted
            pass
    print("chromalab serve: stopped; its uploads and results are deleted", file=sys.stderr)


def _remove_orphaned_workdirs() -> None:
    """Delete the temporary folders of servers that were killed (-9, a crash): they hold users' photos. Each
    folder is named after its server's process id; a folder whose process still runs is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _process_runs(int(pid)):
            _remove(folder)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it runs
        pass
    return True


def listen_on(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port); port 0 picks a free one. A port in use is one line, not uvicorn's
    log and exit status 3."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ChromalabError(f"port {port} on {host} is in use (another server?); choose another with "
                                 "--port") from None
        raise ChromalabError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --host or "
                             "--port") from None
