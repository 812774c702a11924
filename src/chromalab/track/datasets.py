"""MLflow dataset inputs: the data each training run was trained, validated and tested on (the runs table's
Dataset column).

The train, val and test splits of `data/tfrecords` become three MLflow datasets, `chromalab-train`,
`chromalab-val` and `chromalab-test`, logged with the contexts "training", "validation" (what chose the
exported epoch) and "testing" (what the evaluate stage scores, in the same run):
- digest: the records' content hash from dataset.json (its first 16 characters: MLflow keeps 36), so runs
  on the same data group together and a changed dataset shows at a glance;
- source: type "dvc", the data's path in the repository and its DVC hash from dvc.lock. Not the git revision
  to fetch it at: MLflow keeps one dataset per name and digest, so every run on the same data would show the
  first one's. Each run's own is its tag `dvc.rev` (chromalab.track.runs.run_identity):
  `dvc get <repo> <path> --rev <dvc.rev>`;
- profile: photo count, image size, shards, the full content hash, normalisation and contrast variants;
- schema: the records' tensors (photo id, Lab float16, the L variants).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import Schema, TensorSpec

from chromalab.files import dvc_recorded_outputs

SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
DIGEST_CHARS = 16


class DVCDatasetSource(DatasetSource):
    """Data versioned by DVC: a path in the repository (`dvc get <repo> <path> --rev <a run's dvc.rev tag>`),
    and its hash as dvc.lock records it (`md5`, "" where none does), to check what was fetched."""

    def __init__(self, path: str, md5: str = ""):
        self.path, self.md5 = path, md5

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, **kwargs):
        raise NotImplementedError(f"fetch it with `dvc get <repo> {self.path} --rev <the run's dvc.rev tag>`")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DVCDatasetSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "md5": self.md5}

    @classmethod
    def from_dict(cls, source_dict: dict[str, str]) -> DVCDatasetSource:
        return cls(source_dict.get("path", ""), source_dict.get("md5", ""))


class RecordsDataset(MetaDataset):
    """A MetaDataset (no data loaded, only what identifies it) with a profile."""

    def __init__(self, source: DatasetSource, name: str, digest: str | None, schema: Schema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def dataset_inputs(info: dict, data_dir: Path) -> dict[str, RecordsDataset]:
    """dataset.json's splits as MLflow datasets, by context ("training", "validation", "testing")."""
    # Stages run where dvc.yaml is (a DVC temp copy's, for a queued experiment): paths are relative to it.
    here, path = Path.cwd().resolve(), Path(data_dir).resolve()
    relative = path.relative_to(here).as_posix() if path.is_relative_to(here) else str(path)
    source = DVCDatasetSource(relative, dvc_recorded_outputs().get(relative) or "")
    size = int(info["image_size"])
    variants = len(info.get("variants", []))
    specs = [TensorSpec(np.dtype(np.str_), (-1,), "photo_id"),
             TensorSpec(np.dtype(np.float16), (-1, size, size, 3), "lab")]
    if variants:
        specs.append(TensorSpec(np.dtype(np.float16), (-1, size, size, variants), "l_variants"))
    content_hash = str(info.get("content_hash", ""))
    return {
        context: RecordsDataset(
            source, name=f"chromalab-{split}", digest=content_hash[:DIGEST_CHARS] or None, schema=Schema(specs),
            profile={"photos": int(info["counts"][split]), "image_size": size, "shards": len(info["shards"][split]),
                     "content_hash": content_hash, "normalisation": info.get("normalisation"),
                     "variants": info.get("variants", [])},
        )
        for split, context in SPLIT_CONTEXTS.items()
    }


def log_dataset_inputs(info: dict, data_dir: Path) -> None:
    """Log the training, validation and test data into the active run."""
    import mlflow

    from chromalab.track import runs

    runs.require_active_run()
    datasets = dataset_inputs(info, data_dir)
    mlflow.log_inputs(list(datasets.values()), contexts=list(datasets), tags_list=[None] * len(datasets))
