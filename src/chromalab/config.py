"""Typed parameters: `params.yaml` → frozen pydantic models.

Every group is strict: an unknown key or a value of the wrong type is an error that names the key
(`ParamsError: params.yaml: gan.epochs: Input should be a valid integer, got 'ten'`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from chromalab.errors import ChromalabError
from chromalab.files import dvc_recorded_outputs


class ParamsError(ChromalabError):
    """Bad params.yaml: the message is one line naming the key and what to do."""


class _Group(BaseModel):
    # strict: YAML `epochs: "10"` is a mistake, not a number; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)  # no param means ∞


# The PatchGAN's two 4×4 valid convolutions need ≥ 3×3 px after three halvings.
MIN_IMAGE_SIZE = 32
PIX2PIX_L1_LAMBDA = 100.0  # pix2pix (Isola et al. 2017): the L1 term's weight against the adversarial one


def image_size_problem(size: object) -> str | None:
    """What is wrong with `size` as the models' input size, or None: the U-Net halves it down to 1 px."""
    if isinstance(size, int) and size >= MIN_IMAGE_SIZE and size & (size - 1) == 0:
        return None
    return f"must be a power of two >= {MIN_IMAGE_SIZE} (the U-Net halves it down to 1 px), got {size!r}"


class BaseParams(_Group):
    seed: int = 42
    image_size: int = 256

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        problem = image_size_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class DataParams(_Group):
    source: Literal["unsplash", "folder"] = "unsplash"
    url: str = "https://unsplash.com/data/lite/latest"
    sha256: str = ""
    folder: str = ""

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        # caught here, not after the whole archive is downloaded to be refused, run after run
        if v.strip() and not re.fullmatch(r"[0-9a-fA-F]{64}", v.strip()):
            raise ValueError(f"{v!r} is not a SHA-256 (64 hex digits); leave it empty not to check the zip")
        return v


class SplitParams(_Group):
    n_train: int = Field(2000, ge=1)
    n_test: int = Field(200, ge=1)
    # Carved from the candidates after test: training validates (and picks the exported checkpoint) on it,
    # never on test. At least 1: with no val photos nothing could choose the checkpoint honestly.
    n_val: int = Field(100, ge=1)
    n_reserve: int = Field(600, ge=0)
    min_confidence: float = Field(60.0, ge=0, le=100)
    # YAML gives lists; strict mode would only take tuples. Items stay strict str.
    include_keywords: tuple[str, ...] = Field((), strict=False)
    exclude_keywords: tuple[str, ...] = Field((), strict=False)


class ImagesParams(_Group):
    concurrency: int = Field(8, ge=1, le=64)
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(5, ge=0)
    jpeg_quality: int = Field(90, ge=1, le=100)
    min_chroma: float = Field(4.0, ge=0)


class TfrecordsParams(_Group):
    shard_size: int = Field(250, ge=1)
    contrast_variants: bool = True


def _switch_from_yaml11(value: object) -> object:
    """PyYAML reads YAML 1.1, where a bare `on` / `off` is a boolean; DVC's `-S train.xla=off` writes it bare."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_from_yaml11)]


class TrainParams(_Group):
    val_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    sample_every: int = Field(25, ge=1)
    n_samples: int = Field(6, ge=1)
    flip_lr: bool = True
    flip_ud: bool = False
    contrast_aug: bool = True
    mixed_precision: Switch = "auto"
    xla: Switch = "auto"
    # JAX: the training split goes onto the accelerator when it takes at most this many GiB (float16;
    # 2,000 photos at 256 px with contrast variants: 1.5 GiB); beyond it, batches stream from the shards.
    device_data_max_gb: float = Field(16.0, gt=0)


class _Schedule(_Group):
    """A model trained for `epochs`, its rate decaying linearly to zero over the last `decay_epochs`
    ("half": the last half, pix2pix's schedule, following `epochs`; 0: a constant rate)."""

    epochs: int = Field(100, ge=1)
    decay_epochs: int | str = 0

    @field_validator("decay_epochs")
    @classmethod
    def _whole_or_half(cls, v: int | str) -> int | str:
        if v != "half" and not (isinstance(v, int) and v >= 0):
            raise ValueError(f"must be a whole number of epochs >= 0 or half, got {v!r}")
        return v

    @model_validator(mode="after")
    def _decay_within_training(self):
        if self.decay_epochs != "half" and self.decay_epochs > self.epochs:
            raise ValueError(f"decay_epochs ({self.decay_epochs}) must not exceed epochs ({self.epochs}): "
                             "the rate decays over the last decay_epochs of training (or say half)")
        return self

    @property
    def n_decay_epochs(self) -> int:
        return self.epochs // 2 if self.decay_epochs == "half" else self.decay_epochs


class BaselineParams(_Schedule):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    loss: Literal["ssim", "msssim"] = "ssim"
    width: float = Field(1.0, gt=0)
    dropout: float = Field(0.5, ge=0, lt=1)


class GanParams(_Schedule):
    """The levers' defaults here are pix2pix's (the seed's); params.yaml holds chromalab's recipe."""

    epochs: int = Field(200, ge=1)
    decay_epochs: int | str = "half"  # pix2pix
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    beta_1: float = Field(0.5, ge=0, lt=1)
    l1_lambda: float = Field(PIX2PIX_L1_LAMBDA, ge=0)
    recon_loss: Literal["l1", "ssim_l1"] = "l1"
    width: float = Field(1.0, gt=0)
    norm: Literal["batch", "group"] = "batch"
    pretrain_epochs: int = Field(0, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    diffaug: bool = False
    spectral_norm: bool = False
    ema: float = Field(0.0, ge=0, lt=1)
    chroma_expand: float = Field(0.0, ge=0, le=1)
    chroma_pivot: float = Field(20.0, gt=0)

    @model_validator(mode="after")
    def _phases_within_training(self):
        if self.pretrain_epochs + self.warmup_epochs >= self.epochs:
            raise ValueError(f"pretrain_epochs ({self.pretrain_epochs}) + warmup_epochs ({self.warmup_epochs}) "
                             f"must be fewer than epochs ({self.epochs}): the adversarial phase needs an epoch")
        return self


class EvaluateParams(_Group):
    n_sheet: int = Field(8, ge=1)
    n_worst: int = Field(6, ge=1)
    batch_size: int = Field(16, ge=1)


class Params(_Group):
    base: BaseParams = BaseParams()
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    images: ImagesParams = ImagesParams()
    tfrecords: TfrecordsParams = TfrecordsParams()
    train: TrainParams = TrainParams()
    baseline: BaselineParams = BaselineParams()
    gan: GanParams = GanParams()
    evaluate: EvaluateParams = EvaluateParams()

    def model(self, name: str) -> BaselineParams | GanParams:
        if name not in MODEL_NAMES:
            raise ParamsError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
        return getattr(self, name)


MODEL_NAMES = ("baseline", "gan")


def trained_model_path(model_name: str, models_root: Path = Path("models")) -> Path:
    """models/<model>/model.keras, which `train@<model>` writes; a one-line error while it does not exist."""
    path = Path(models_root) / model_name / "model.keras"
    if not path.is_file():
        root = Path(models_root).parent
        if path.relative_to(root).as_posix() in dvc_recorded_outputs(root / "dvc.lock"):  # DVC removed it: a failed run
            raise ChromalabError(f"{path} does not exist, but dvc.lock records it: `dvc checkout {path}` brings it "
                                 "back from DVC's cache (`dvc pull` it where the cache lacks it)")
        raise ChromalabError(f"{path} does not exist: train the {model_name} model first "
                             f"(`dvc repro train@{model_name}` or `chromalab train {model_name}`)")
    return path


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate a params mapping; the first problem becomes a one-line ParamsError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of parameter groups, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        elif err["type"] != "value_error":  # our own validators already quote the value
            msg = f"{msg}, got {err.get('input')!r}"
        else:  # pydantic's wording for a ValueError our validator raised, not the user's concern
            msg = msg.removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ParamsError(f"{source}: {key}: {msg}{more}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: a folder, not a params file; name the YAML file itself")
    if not path.is_file():
        where = "run from the repository root (where dvc.yaml is)" if path == Path("params.yaml") else "check the path"
        raise ParamsError(f"{path}: not found; {where}")
    data = path.read_bytes()
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_ParamsLoader)
    except UnicodeDecodeError as exc:  # an editor's Latin-1, or a photo named by mistake
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParamsError(f"{path}: not UTF-8 text (line {line:,}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where} ({problem})") from None
    return parse_params(raw, str(path))


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-05` as the float it is (YAML 1.2, and how DVC writes `-S lr=0.00001`):
    YAML 1.1 wants a dot in the mantissa, so PyYAML made it a string and a small learning rate was refused."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def flatten(params: BaseModel, prefix: str = "") -> dict[str, object]:
    """`{"gan.epochs": 200, ...}`: for MLflow params and DVC-style keys."""
    out: dict[str, object] = {}
    for name, value in params:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, f"{key}."))
        elif isinstance(value, tuple):
            out[key] = ",".join(map(str, value))
        else:
            out[key] = value
    return out
