"""The registered model's pyfunc: in process, and behind a real `mlflow models serve` on 127.0.0.1.

One tiny untrained generator (32 px, width ×0.125) is registered as chromalab-gan@champion in a temporary
SQLite store; the server for it starts once, early, so its start overlaps the in-process tests.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from chromalab.serve import pyfunc
from chromalab.track import registry
from chromalab.track import runs
from chromalab.colorize import colorize_paths
from chromalab.config import parse_params
from chromalab.train.models import build_generator
from chromalab.bench.samples import real_crops
from conftest import _free_port, stop_process_group, wait_until_up

BIN = Path(sys.executable).parent
CHAMPION = "models:/chromalab-gan@champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """chromalab-gan@champion in a fresh SQLite store; the uri and the .keras file it holds."""
    root = tmp_path_factory.mktemp("registry")
    keras_file = root / "model.keras"
    build_generator(32, width=0.125).save(keras_file)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="test"):
            version = registry.register_trained_model("gan", pyfunc.log_colorizer(keras_file), "h")
        mlflow.MlflowClient(uri).set_registered_model_alias("chromalab-gan", "champion", version.version)
    return {"uri": uri, "keras_file": keras_file, "root": root}


@pytest.fixture(scope="module")
def model_server(store):
    """`mlflow models serve -m models:/chromalab-gan@champion --env-manager local` on 127.0.0.1."""
    port = _free_port()
    log_path = store["root"] / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [BIN / "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}, cwd=store["root"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    yield f"http://127.0.0.1:{port}", proc, log_path
    stop_process_group(proc)


@pytest.fixture(scope="module", autouse=True)
def _start_server_early(model_server):
    """Started with the module's first test: it boots while the in-process tests run."""


@pytest.fixture(scope="module")
def served(model_server) -> str:
    url, proc, log_path = model_server
    wait_until_up(f"{url}/ping", proc, log_path, timeout_s=180)
    return url


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(real_crops(1, 80, seed=5)[0]).resize((96, 64))


def _decoded(value) -> Image.Image:
    data = value if isinstance(value, bytes) else base64.b64decode(value)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image


def test_pyfunc_colours_any_photo_colorize_reads_at_full_size_as_colorize_does(store, photo, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    model = mlflow.pyfunc.load_model(CHAMPION)
    jpeg = _encoded(photo, "JPEG", quality=95)
    rotated = _encoded(photo.transpose(Image.Transpose.ROTATE_270), "JPEG",
                       exif=_exif_orientation(6))  # stored 64×96, upright (EXIF 6 = rotate 90° clockwise) 96×64
    sixteen = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)).convert("I;16")
    inputs = {
        "jpeg bytes": jpeg,
        "jpeg base64": base64.b64encode(jpeg).decode(),
        "gray png": _encoded(photo.convert("L"), "PNG"),
        "rgba png": _encoded(photo.convert("RGBA"), "PNG"),
        "16-bit png": _encoded(sixteen, "PNG"),
        "palette gif": _encoded(photo.convert("P"), "GIF"),
        "exif-rotated": rotated,
        "large": _encoded(photo.resize((1200, 800)), "JPEG"),
    }
    out = model.predict(pd.DataFrame({"image": list(inputs.values())}))
    assert list(out.columns) == ["image", "width", "height"]
    for (name, _), row in zip(inputs.items(), out.itertuples()):
        expected = (1200, 800) if name == "large" else (96, 64)
        assert (row.width, row.height) == expected, name
        assert _decoded(row.image).size == expected, name
    # exactly the JPEG `chromalab colorize` writes for the same photo with the same model
    (tmp_path / "p.jpg").write_bytes(jpeg)
    colorize_paths([tmp_path / "p.jpg"], model=str(store["keras_file"]))
    assert out["image"][0] == out["image"][1] == (tmp_path / "p_color.jpg").read_bytes()


def _exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_pyfunc_names_the_row_that_is_not_a_photo(store, photo, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    model = mlflow.pyfunc.load_model(CHAMPION)
    with pytest.raises(MlflowException, match=r"row 1: the GIF photo is damaged or cut short") as error:
        model.predict(pd.DataFrame({"image": [_encoded(photo, "PNG"), b"GIF89a truncated"]}))
    assert error.value.get_http_status_code() == 400


def _invoke(url: str, *files: bytes) -> requests.Response:
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f).decode()] for f in files]}}
    return requests.post(f"{url}/invocations", json=payload, timeout=120)


def test_mlflow_models_serve_answers_photos_rejects_a_corrupt_file_and_stays_up(served, store, photo,
                                                                                monkeypatch):
    jpeg = _encoded(photo, "JPEG", quality=95)
    answer = _invoke(served, jpeg)
    assert answer.status_code == 200, answer.text[:2000]
    (prediction,) = answer.json()["predictions"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    in_process = mlflow.pyfunc.load_model(CHAMPION).predict(pd.DataFrame({"image": [jpeg]}))
    assert base64.b64decode(prediction["image"]) == in_process["image"][0]
    assert (prediction["width"], prediction["height"]) == (96, 64)

    corrupt = _invoke(served, jpeg[: len(jpeg) // 3])
    assert corrupt.status_code == 400
    assert corrupt.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 0: the JPEG photo is cut short" in corrupt.json()["message"]
    assert requests.get(f"{served}/ping", timeout=5).status_code == 200

    # 12 MP, gray: an old scan, the common case (and colorize's faster path: the suite stays short)
    large = _encoded(photo.convert("L").resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90)
    answer = _invoke(served, large)
    assert answer.status_code == 200, answer.text[:2000]
    (prediction,) = answer.json()["predictions"]
    assert (prediction["width"], prediction["height"]) == (4000, 3000)
    assert _decoded(prediction["image"]).size == (4000, 3000)


def test_mlflow_models_serve_says_what_is_wrong_with_a_bad_file_in_the_users_words(served, tmp_path):
    from bad_files import assert_in_user_words, bad_files

    for name, (data, problem) in bad_files().items():
        (tmp_path / name).write_bytes(data)
        answer = _invoke(served, (tmp_path / name).read_bytes())
        assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE", name
        assert answer.json()["message"].startswith("row 0: "), answer.text
        assert_in_user_words(answer.json()["message"], problem)
