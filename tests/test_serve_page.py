"""`chromalab serve` in a real headless browser: the system's Chromium, driven by Selenium.

No browser is downloaded: Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver (Debian's
`chromium` and `chromium-driver` packages); without them the browser test is skipped, saying how to
install them. The page's server runs in a thread of this process, on 127.0.0.1, with a tiny model.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from chromalab.colorize import colorize_paths, load_colorizer
from chromalab.train.models import build_generator
from chromalab.bench.samples import real_crops
from chromalab.serve.app import create_app
from conftest import _free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MAX_UPLOAD_MB = 0.5
WAIT_S = 60


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.keras"
    build_generator(32, width=0.125).save(path)
    return path


@pytest.fixture(scope="module")
def page(model_file, tmp_path_factory):
    """The page's server (the app `chromalab serve` runs) on 127.0.0.1, in a thread; its URL."""
    import uvicorn

    workdir = tmp_path_factory.mktemp("serve-work")
    app = create_app(load_colorizer(str(model_file)), model_label=model_file.name, workdir=workdir, host="127.0.0.1",
                     max_upload_mb=MAX_UPLOAD_MB)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the page's server did not start"
    yield f"http://127.0.0.1:{port}", workdir
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    crops = real_crops(2, 80, seed=11)
    paths = {"jpeg": folder / "family.jpg", "png": folder / "gray scan.png", "bad": folder / "broken.jpg",
             "huge": folder / "huge.png"}
    Image.fromarray(crops[0]).resize((120, 80)).save(paths["jpeg"], quality=95)
    Image.fromarray(crops[1]).convert("L").resize((64, 96)).save(paths["png"])
    paths["bad"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    paths["huge"].write_bytes(np.random.default_rng(0).bytes(int(MAX_UPLOAD_MB * 1e6) + 1000))
    return paths


def test_the_api_rejects_bad_and_oversized_files_with_a_message_and_carries_on(page, photos):
    url, workdir = page
    bad = requests.post(f"{url}/api/colorize", params={"name": "../../etc/broken.jpg"},
                        data=photos["bad"].read_bytes(), timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"].startswith("broken.jpg: the JPEG photo is cut short")
    huge = requests.post(f"{url}/api/colorize", params={"name": "huge.png"}, data=photos["huge"].read_bytes(),
                         timeout=30)
    # 0.501 MB: one decimal would read "0.5 MB; the limit is 0.5 MB"
    assert huge.status_code == 413 and huge.json()["detail"] == "huge.png is 0.501 MB; the limit is 0.5 MB"
    chunked = requests.post(f"{url}/api/colorize", params={"name": "huge.png"}, timeout=30,  # no Content-Length
                            data=iter([photos["huge"].read_bytes()[i : i + 65536] for i in range(0, 600_000, 65536)]))
    assert chunked.status_code == 413 and "over the 0.5 MB limit" in chunked.json()["detail"]
    assert requests.post(f"{url}/api/colorize", data=b"", timeout=30).status_code == 400
    fetched = requests.get(f"{url}/api/colorize", timeout=30)  # a browser's address bar, or curl without -d
    assert fetched.status_code == 405 and fetched.headers["allow"] == "POST" and "POST" in fetched.json()["detail"]
    good = requests.post(f"{url}/api/colorize", params={"name": "family.jpg"}, data=photos["jpeg"].read_bytes(),
                         timeout=60)
    assert good.status_code == 200
    assert good.json()["download_name"] == "family_color.jpg"
    assert (good.json()["width"], good.json()["height"]) == (120, 80)
    # nothing of the refused uploads is left, and everything kept is inside the temporary folder
    kept = [p for p in workdir.rglob("*") if p.is_file()]
    assert kept and all(p.parent.parent == workdir for p in kept)
    assert {p.name for p in kept} == {"colour", "gray", "preview"}


def test_the_api_says_what_is_wrong_with_a_bad_file_in_the_users_words(page, tmp_path):
    from bad_files import assert_in_user_words, bad_files

    url, _ = page
    for name, (data, problem) in bad_files().items():
        (tmp_path / name).write_bytes(data)
        answer = requests.post(f"{url}/api/colorize", params={"name": name}, data=(tmp_path / name).read_bytes(),
                               timeout=30)
        assert answer.status_code == (400 if not data else 422), name
        assert answer.json()["detail"].startswith(f"{name}: "), answer.text
        assert_in_user_words(answer.json()["detail"], problem)


def test_the_api_refuses_a_form_upload_survives_a_cut_off_one_and_colours_a_transparent_photo(page, photos):
    url, workdir = page
    form = requests.post(f"{url}/api/colorize", files={"file": ("family.jpg", photos["jpeg"].read_bytes())},
                         timeout=30)
    assert form.status_code == 415 and "--data-binary" in form.json()["detail"]

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as cut_off:  # says 100 kB, sends 1 kB, leaves
        cut_off.sendall(b"POST /api/colorize?name=cut.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
                        + photos["jpeg"].read_bytes()[:1000])
        assert _within(10, lambda: any(workdir.rglob("upload")))  # the server is receiving it
    assert _within(10, lambda: not any(workdir.rglob("upload")))  # and once the client is gone, so is the upload

    buffer = io.BytesIO()  # a PNG with transparency under the default name, photo.jpg: JPEG holds no alpha
    Image.open(photos["jpeg"]).convert("RGBA").save(buffer, "PNG")
    answer = requests.post(f"{url}/api/colorize", data=buffer.getvalue(), timeout=60)
    assert answer.status_code == 200 and answer.json()["download_name"] == "photo_color.jpg"


def test_the_api_keeps_names_refuses_other_sites_says_a_result_was_dropped_and_survives_its_own_failure(
        page, photos, monkeypatch):
    from chromalab.serve import app as serve_app

    url, workdir = page
    jpeg = photos["jpeg"].read_bytes()
    names = {"photo (1).jpg": "photo (1)_color.jpg", "Tom & Jerry+1, 2024.jpg": "Tom & Jerry+1, 2024_color.jpg",
             "नमस्ते.jpg": "नमस्ते_color.jpg", "Cafe\u0301.jpg": "Caf\u00e9_color.jpg",
             "a\x00b\r\n.jpg": "ab_color.jpg"}
    for sent, download in names.items():  # they were mangled: "photo _1__color.jpg", "नमस_त_"
        answer = requests.post(f"{url}/api/colorize", params={"name": sent}, data=jpeg, timeout=60)
        assert answer.json()["download_name"] == download, sent
    fetched = requests.get(f"{url}{answer.json()['result']}", timeout=30)
    assert "ab_color.jpg" in fetched.headers["content-disposition"]

    other_site = requests.post(f"{url}/api/colorize", data=jpeg, headers={"Origin": "http://127.0.0.2:8080"},
                               timeout=30)
    assert other_site.status_code == 403 and "uploads from http://127.0.0.2:8080 are refused" in other_site.text
    same_site = requests.post(f"{url}/api/colorize", data=jpeg, headers={"Origin": url}, timeout=60)
    assert same_site.status_code == 200
    port = url.rsplit(":", 1)[1]
    rebound = requests.post(f"{url}/api/colorize", data=jpeg, timeout=30,  # evil.example made to point here
                            headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
    assert rebound.status_code == 403 and "addressed to 127.0.0.1, ::1, localhost only" in rebound.text
    assert requests.post(f"http://localhost:{port}/api/colorize", data=jpeg, timeout=60).status_code == 200

    monkeypatch.setattr(serve_app, "MAX_RESULTS", 1)  # the next result drops every older one
    first = same_site.json()["result"]
    kept = requests.post(f"{url}/api/colorize", data=jpeg, timeout=60).json()["result"]
    gone = requests.get(f"{url}{first}", timeout=30)
    assert gone.status_code == 410 and "keeps its last 1, 2 GB at most" in gone.json()["detail"]
    monkeypatch.setattr(serve_app, "MAX_RESULTS", 200)
    monkeypatch.setattr(serve_app, "MAX_RESULTS_GB", 1e-9)  # less than one result: only the newest is kept
    newest = requests.post(f"{url}/api/colorize", data=jpeg, timeout=60).json()["result"]
    assert requests.get(f"{url}{kept}", timeout=30).status_code == 410
    assert requests.get(f"{url}{newest}", timeout=30).status_code == 200
    assert len([p for p in workdir.iterdir() if p.is_dir()]) == 1

    def out_of_memory(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(serve_app.colorize, "colour_bytes", out_of_memory)
    failed = requests.post(f"{url}/api/colorize", params={"name": "big.jpg"}, data=jpeg, timeout=60)
    assert failed.status_code == 500
    assert failed.json()["detail"] == "big.jpg: the server failed colouring it (MemoryError)"
    assert not list(workdir.rglob("upload"))  # its upload is not kept
    monkeypatch.undo()

    def a_bug(*args, **kwargs):  # our own code's error after the photo was read: never blamed on the photo
        raise IndexError("list index out of range")
    monkeypatch.setattr(serve_app.colorize, "compare_sheet", a_bug)
    failed = requests.post(f"{url}/api/colorize", params={"name": "fine.jpg"}, data=jpeg, timeout=60)
    assert failed.status_code == 500 and "IndexError" in failed.json()["detail"]


def test_uploads_waiting_their_turn_do_not_hold_up_the_page_or_downloads(page, photos, monkeypatch):
    """Each waiting upload held one of the server's 40 worker threads: 60 queued uploads made /api/info and
    downloads wait 24 s."""
    from concurrent.futures import ThreadPoolExecutor

    from chromalab.serve import app as serve_app

    url, _ = page
    real = serve_app.colorize.colour_bytes

    def slow(*args, **kwargs):
        time.sleep(0.15)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_app.colorize, "colour_bytes", slow)
    jpeg = photos["jpeg"].read_bytes()
    with ThreadPoolExecutor(90) as pool:  # more than the server's 40 worker threads
        uploads = [pool.submit(requests.post, f"{url}/api/colorize", data=jpeg, timeout=120) for _ in range(90)]
        time.sleep(1.5)  # all of them sent, most waiting their turn
        started = time.monotonic()
        assert requests.get(f"{url}/api/info", timeout=60).status_code == 200
        waited = time.monotonic() - started
        assert all(upload.result().status_code == 200 for upload in uploads)
    assert waited < 3.0, f"/api/info waited {waited:.1f} s behind the queued uploads"


def test_the_api_says_so_when_the_server_cannot_store_an_upload_and_recovers(page, photos):
    url, workdir = page
    aside = workdir.with_name(workdir.name + "-aside")
    workdir.rename(aside)  # its folder gone (a temp cleaner), as a full disk would fail the same writes
    try:
        answer = requests.post(f"{url}/api/colorize", params={"name": "family.jpg"},
                               data=photos["jpeg"].read_bytes(), timeout=30)
    finally:
        aside.rename(workdir)
    assert answer.status_code == 507, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("family.jpg: the server could not store the upload (") and "\n" not in detail
    again = requests.post(f"{url}/api/colorize", params={"name": "family.jpg"}, data=photos["jpeg"].read_bytes(),
                          timeout=60)
    assert again.status_code == 200


def _within(seconds: float, condition) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def _browser(download_dir: Path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("the browser test needs the system Chromium: `sudo apt-get install chromium chromium-driver`"
                    " (Debian/Ubuntu); .ci/run installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    # An explicit driver path: Selenium Manager never looks for, let alone downloads, a browser or driver. Its
    # TMPDIR is a folder of its own, deleted after: Chromium leaves a folder for its singleton socket there at
    # every run. A short one: a socket's path holds 107 bytes, which a test's tmp_path under xdist can pass.
    with tempfile.TemporaryDirectory(prefix="chromium-") as scratch:
        service = Service(executable_path=str(CHROMEDRIVER), env={**os.environ, "TMPDIR": scratch})
        browser = webdriver.Chrome(service=service, options=options)
        try:
            yield browser
        finally:
            browser.quit()


def test_an_upload_that_stalls_is_dropped_with_408_not_held_for_ever(page, monkeypatch):
    monkeypatch.setattr("chromalab.serve.app.UPLOAD_STALL_S", 1.0)
    url, _ = page
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as client:
        client.sendall(b"POST /api/colorize?name=slow.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
                       + b"\xff\xd8" * 500)  # 1 kB of the 100 kB announced, then nothing
        answer = b""
        while b"the upload stalled" not in answer and (chunk := client.recv(4096)):  # head and body may part
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"the upload stalled" in answer


def test_serve_names_a_port_in_use_in_one_line_and_port_0_picks_a_free_one():
    from chromalab.errors import ChromalabError
    from chromalab.serve.app import listen_on

    with listen_on("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert port > 0
        with pytest.raises(ChromalabError, match=rf"^port {port} on 127.0.0.1 is in use \(another server\?\); "
                                                 "choose another with --port$"):
            listen_on("127.0.0.1", port)


def test_in_a_browser_photos_are_uploaded_shown_side_by_side_and_download_as_colorize_writes_them(
        page, photos, model_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with _browser(downloads) as browser:
        browser.get(url)
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(ready.text_to_be_present_in_element((By.ID, "info"), "Model: model.keras"))
        chooser = browser.find_element(By.ID, "files")
        gone = tmp_path / "gone.jpg"  # chosen, then deleted while the photos before it upload
        shutil.copy(photos["jpeg"], gone)
        chooser.send_keys("\n".join([*(str(photos[k]) for k in ("jpeg", "bad", "huge", "png")), str(gone)]))
        gone.unlink()
        wait.until(ready.text_to_be_present_in_element((By.ID, "overall-text"), "5 of 5 photo(s) done"))

        items = {item.find_element(By.TAG_NAME, "strong").text: item
                 for item in browser.find_elements(By.CLASS_NAME, "item")}
        assert "the JPEG photo is cut short" in items["broken.jpg"].find_element(By.CLASS_NAME, "error").text
        refused = items["huge.png"].find_element(By.CLASS_NAME, "error").text
        assert "huge.png is 0.501 MB; the limit is 0.5 MB" in refused
        assert "could not read gone.jpg on this computer" in items["gone.jpg"].find_element(By.CLASS_NAME, "error").text
        done = items["family.jpg"]
        assert "120×80" in done.find_element(By.CLASS_NAME, "status").text
        for image in done.find_elements(By.CSS_SELECTOR, ".compare img"):  # gray | coloured, both loaded
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        slider = done.find_element(By.CLASS_NAME, "slider")
        browser.execute_script("arguments[0].value = 20; arguments[0].dispatchEvent(new Event('input'))", slider)
        assert "20%" in done.find_element(By.CLASS_NAME, "colour").get_attribute("style")

        for name in ("family.jpg", "gray scan.png"):
            items[name].find_element(By.CLASS_NAME, "download").click()
        expected = {"family_color.jpg", "gray scan_color.png"}
        deadline = time.monotonic() + WAIT_S
        while {p.name for p in downloads.iterdir()} != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {p.name for p in downloads.iterdir()} == expected

    by_colorize = tmp_path / "colorize"
    shutil.copy(photos["jpeg"], tmp_path / "family.jpg")
    shutil.copy(photos["png"], tmp_path / "gray scan.png")
    colorize_paths([tmp_path / "family.jpg", tmp_path / "gray scan.png"], out_dir=by_colorize, model=str(model_file))
    for name in expected:
        assert (downloads / name).read_bytes() == (by_colorize / name).read_bytes(), name


def test_chromalab_serve_stops_cleanly_and_deletes_what_a_killed_server_left(model_file, tmp_path):
    """Ctrl-C ends `chromalab serve` with its own line and status 0, its uploads deleted; a folder left by a
    server killed with -9 (its process gone) is deleted when the next one starts, a running server's is kept."""
    orphan = tmp_path / f"chromalab-serve-{_gone_pid()}-x1"
    running = tmp_path / f"chromalab-serve-{os.getpid()}-x2"
    for folder in (orphan, running):
        (folder / "a1").mkdir(parents=True)
        (folder / "a1" / "colour").write_bytes(b"someone's photo")
    server = subprocess.Popen(
        [sys.executable, "-c", "from chromalab.cli import run; run()", "serve", "--model", str(model_file),
         "--port", "0"], env={**os.environ, "TMPDIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True)
    url = _served_url(server)
    upload = requests.post(f"{url}/api/colorize", params={"name": "rose.png"}, data=_png_bytes(), timeout=60)
    assert upload.status_code == 200, upload.text
    workdirs = list(tmp_path.glob(f"chromalab-serve-{server.pid}-*"))
    assert len(workdirs) == 1 and any(p.is_file() for p in workdirs[0].rglob("*"))
    assert not orphan.exists() and running.exists()

    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert err.strip().splitlines()[-1] == "chromalab serve: stopped; its uploads and results are deleted"
    assert not workdirs[0].exists()


def _served_url(server: subprocess.Popen) -> str:
    """The address in the banner `chromalab serve` prints once it listens."""
    lines = []
    for line in server.stderr:
        lines.append(line)
        if found := re.match(r"chromalab serve: (http://\S+)", line):
            return found.group(1)
    pytest.fail(f"no banner from chromalab serve (exit {server.wait()}):\n{''.join(lines)[-3000:]}")


def _gone_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(real_crops(1, 48)[0]).save(buffer, "PNG")
    return buffer.getvalue()
