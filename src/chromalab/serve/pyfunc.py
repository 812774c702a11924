"""The registered model's pyfunc flavour: photos in, coloured full-resolution JPEGs out.

Input: a DataFrame with a column `image` holding photo files, as bytes or base64 text (JSON clients of
`mlflow models serve` send base64; MLflow decodes it for the binary column). Anything `chromalab colorize`
reads works: any size, gray/colour/16-bit/palette/alpha, EXIF orientation applied. Output: a DataFrame with
`image` (JPEG bytes, quality 95, at the photo's own size; base64 in JSON answers), `width` and `height`.
A file that is not a photo is a client error (HTTP 400 from the scoring server), naming the row and saying
what was wrong with the file, in colorize's words.

The Keras model travels as an artifact (`model.keras`) and is run by chromalab.colorize, so served photos
come out exactly as `chromalab colorize` makes them. Serving needs chromalab installed (`--env-manager local`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

COLUMN = "image"
KERAS_ARTIFACT = "keras_model"
CODE_FILE = Path(__file__).with_name("colorizer_model.py")  # what log_colorizer logs (models from code)
PYFUNC_NAME = "colorizer"  # its name in a training run


def signature() -> mlflow.models.ModelSignature:
    from mlflow.types import ColSpec, DataType, Schema

    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, COLUMN)]),
        outputs=Schema([ColSpec(DataType.binary, COLUMN), ColSpec(DataType.long, "width"),
                        ColSpec(DataType.long, "height")]),
    )


def _file_bytes(value: object, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            pass
    raise _bad_input(f"row {row}: column {COLUMN!r} must hold a photo file as bytes or base64 text, "
                     f"got {type(value).__name__}")


class _ClientError(MlflowException):
    """HTTP 400 from `mlflow models serve`, with its message kept as written: the scoring server rewrites a
    failed prediction's message to "Failed to predict data '<the input DataFrame>'. \nError: …", which puts the
    file's bytes and a programmer's label before the words a user can act on."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException's constructor
            self._message = value


def _bad_input(message: str) -> Exception:
    return _ClientError.invalid_parameter_value(message)  # → HTTP 400 from `mlflow models serve`


class Colorizer(mlflow.pyfunc.PythonModel):
    """chromalab's colorizer as an MLflow pyfunc; `colorizer` is the loaded Keras model."""

    def load_context(self, context) -> None:
        from chromalab.colorize import load_colorizer

        self.colorizer = load_colorizer(context.artifacts[KERAS_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from chromalab.colorize import UnreadablePhoto, colour_bytes
        from chromalab.colorize.photos import write_photo

        if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input:
            raise _bad_input(f"expected a DataFrame with a column {COLUMN!r} of photo files (bytes or base64)")
        images, widths, heights = [], [], []
        for row, value in enumerate(model_input[COLUMN]):
            data = _file_bytes(value, row)
            try:
                photo, coloured = colour_bytes(self.colorizer, data, output_format="JPEG")
            except UnreadablePhoto as exc:
                raise _bad_input(f"row {row}: {exc}") from None
            buffer = io.BytesIO()
            write_photo(coloured, buffer, "JPEG", photo.exif)  # the bytes `chromalab colorize` writes
            images.append(buffer.getvalue())
            widths.append(coloured.width)
            heights.append(coloured.height)
        return pd.DataFrame({COLUMN: images, "width": np.asarray(widths, dtype=np.int64),
                             "height": np.asarray(heights, dtype=np.int64)})


def log_colorizer(keras_file: Path, name: str = PYFUNC_NAME) -> "ModelInfo":
    """Log the pyfunc colorizer (with `keras_file` inside) into the active run."""
    import mlflow

    from chromalab.track import runs

    runs.discard_unfinished_models(name)
    # MLflow copies the Keras file into the logged model under a "Downloading artifacts" progress bar: a local
    # copy, shown in every training stage's output; off for that copy.
    with warnings.catch_warnings(), mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        # No input example on purpose: it would be a photo stored with a model that may be shared.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name, python_model=CODE_FILE, artifacts={KERAS_ARTIFACT: str(keras_file)},
            signature=signature(),
            pip_requirements=[*runs.model_requirements(), *_installed("pillow", "scikit-image", "pandas")],
        )


def _installed(*packages: str) -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in packages]
