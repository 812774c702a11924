"""Loading a colorizer for `colorize` and `serve`: a model name, a .keras file or an MLflow URI → a Keras
model L [B, S, S, 1] → ab [B, S, S, 2], checked, made cheaper to run (chromalab.colorize.inference), and the
threads TensorFlow gives it."""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from pathlib import Path

from chromalab.config import MODEL_NAMES, trained_model_path
from chromalab.errors import DISK_FULL_ERRNOS, ChromalabError, one_line

DEFAULT_IMAGE_SIZE = 256  # for models without a fixed input size, when image_size is not given
URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/…, models:/…, s3://…; not C:/…
ZEROS_INITIALIZER = {"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name": None}
CHECKOUT = Path(__file__).resolve().parents[3]  # the repository of an editable install (src/chromalab/colorize/…)


def model_file(model: str, models_root: Path = Path("models")) -> Path | None:
    """The .keras file `model` names (checked to exist), or None for an MLflow URI; bad names are one-line
    errors. Cheap: colorize checks it before any photo is read."""
    if URI_PATTERN.match(model) and model not in MODEL_NAMES:
        return None
    if model in MODEL_NAMES:
        return trained_model_path(model, _models_root(models_root, model))
    path = Path(model)
    if path.suffix != ".keras":
        raise ChromalabError(f"--model {model!r}: expected {', '.join(MODEL_NAMES)}, a .keras file, "
                             "or an MLflow model URI (runs:/<run id>/model, models:/chromalab-gan@champion)")
    if not path.is_file():
        raise ChromalabError(f"model file {path} does not exist: check the path")
    return path


def _models_root(models_root: Path, model: str) -> Path:
    """`models_root`, or outside the repository (`chromalab colorize` run from your photos' folder) that of the
    checkout chromalab is installed from; with neither, a one-line error that says where to run."""
    if Path(models_root, model).is_dir() or Path(models_root).is_absolute() or Path("dvc.yaml").is_file():
        return models_root  # where it is, or where `train` puts it
    if (CHECKOUT / "dvc.yaml").is_file() and (CHECKOUT / models_root / model).is_dir():
        return CHECKOUT / models_root
    raise ChromalabError(f"no trained {model} model in {Path.cwd()}: run chromalab from the repository root, "
                         f"or pass --model path/to/{model}/model.keras")


def _unpacked_file(filename, model_path: Path, temp: Path) -> bool:
    """Whether a file an error names is one Keras unpacked the model into (in the temporary folder), not the
    model file itself (which may lie there too)."""
    return isinstance(filename, str) and Path(filename) != model_path and Path(filename).is_relative_to(temp)


def load_colorizer(model: str, models_root: Path = Path("models")):
    """A Keras model L [B, S, S, 1] → ab [B, S, S, 2], from a model name, a .keras file or an MLflow URI."""
    path = model_file(model, models_root)
    if path is None:
        return _load_mlflow(model)
    try:
        return _checked(_load_keras_file(path), str(path))
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        temp = Path(tempfile.gettempdir())
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL_ERRNOS or _unpacked_file(exc.filename, path, temp)):
            raise ChromalabError(f"cannot load model {path}: Keras unpacks it into the temporary folder {temp}: "
                                 f"{(exc.strerror or str(exc)).lower()}; free space there, or set TMPDIR to a folder "
                                 "with room") from None
        raise ChromalabError(f"cannot load model {path}: {one_line(exc)}") from None


def _load_keras_file(path: Path):
    """`keras.saving.load_model(path, compile=False)` without first filling every weight with random numbers
    that the file's weights then replace: its initialisers become Zeros (a second of CPU before the first
    photo, README "Measured figures behind the code"). Weights the file lacks fail as in load_model."""
    import keras

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(_zero_initializers(config))
        if not isinstance(model, keras.Model):  # a damaged file's config: `{}`, or one layer's
            raise ValueError(f"its config.json describes a {type(model).__name__}, not a Keras model")
        # from a file of its own: h5py reading inside the zip seeks back and forth, which zipfile pays for
        # by reading from the member's start again
        model.load_weights(archive.extract("model.weights.h5", folder))
    return model


def _zero_initializers(config):
    if isinstance(config, list):
        return [_zero_initializers(item) for item in config]
    if not isinstance(config, dict):
        return config
    return {key: ZEROS_INITIALIZER if key.endswith("_initializer") and isinstance(value, dict)
            else _zero_initializers(value) for key, value in config.items()}


def _load_mlflow(uri: str):
    """A run's Keras model (runs:/<id>/model) or a registered chromalab model, whose pyfunc holds one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from chromalab.track import runs

    runs.use_store()
    runs.check_tracking_server(reading=True)  # in seconds: MLflow's retries wait minutes for a server that is down
    try:
        # Into a folder removed after loading: MLflow downloads a model URI into a temporary folder of its own
        # and never removes it, so each load left a copy of the model (200 MB at full size) in the temp folder.
        with tempfile.TemporaryDirectory(prefix="chromalab-model-") as folder:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
            if "keras" in mlflow.models.Model.load(local).flavors:
                loaded = mlflow.keras.load_model(local, load_model_kwargs={"compile": False})
            else:  # chromalab.serve.pyfunc.Colorizer: its Keras model is loaded with it
                loaded = getattr(mlflow.pyfunc.load_model(local).unwrap_python_model(), "colorizer", None)
        if loaded is None:
            raise ValueError("not a chromalab colorizer (no Keras flavour, no chromalab pyfunc)")
    except (MlflowException, OSError, ValueError) as exc:
        raise ChromalabError(f"cannot load MLflow model {uri} from {runs.tracking_uri()}: "
                             f"{one_line(exc)} (set MLFLOW_TRACKING_URI if it lives elsewhere)") from None
    return _checked(loaded, uri)


def _checked(model, name: str):
    """`model`, checked to be a colorizer, made cheaper to run (chromalab.colorize.inference)."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 1 and model.output_shape[-1] == 2):
        raise ChromalabError(f"model {name} maps {shape} → {model.output_shape}; a colorizer maps "
                             "L [B, S, S, 1] → ab [B, S, S, 2]")
    from chromalab.colorize.inference import for_inference  # Keras: imported once a model is being loaded

    return for_inference(model)


def model_input_size(model, image_size: int | None) -> tuple[int, int]:
    """(height, width) the model is fed: its own fixed size (the U-Net has one), else image_size or 256."""
    height, width = model.input_shape[1:3]
    if height is not None and width is not None:
        return height, width
    side = image_size or DEFAULT_IMAGE_SIZE
    return height or side, width or side


def limit_model_threads(cores: int) -> int | None:
    """On TensorFlow, give the model a third of the cores (1 of 2) before it first runs: the photo workers
    keep every core busy, and more TensorFlow threads only contend with them (README, "Measured figures behind
    the code"). The model is about a third of the CPU work per photo.
    TensorFlow fixes its threads at its first operation, so this is possible only before that (not in a
    process that already ran TensorFlow, nor under JAX). Returns the threads set, or None."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    threads = max(1, round(cores / 3))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)  # one model call at a time
    except RuntimeError:  # TensorFlow is already running in this process: its threads stay as they are
        return None
    return threads
