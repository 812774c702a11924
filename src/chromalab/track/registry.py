"""MLflow model registry: every trained model becomes a version of `chromalab-<model>`; evaluate crowns one.

`train@<model>` logs a pyfunc colorizer (chromalab.serve.pyfunc, the .keras file inside) into its run, and
this module registers it as a new version, tagged with what made it: DVC experiment, git commit, dataset digest.
`evaluate` tags each model's version with its test metrics and the digest of the test set it was scored on,
then moves two aliases among the versions scored on that same test set:
- `champion`: the lowest test ΔE00 (`test_delta_e00`; lower is better, see chromalab.evaluate.metrics);
- `challenger`: the newest version, the one just trained, which may also be the champion.
Versions scored on another test set keep their tags but can't win: their ΔE00 is not comparable.

`models:/chromalab-gan@champion` then works for `chromalab colorize`, `chromalab serve` and
`mlflow models serve`. The registry lives in the tracking store (chromalab.track.runs.tracking_uri()).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from chromalab.config import MODEL_NAMES

if TYPE_CHECKING:
    import mlflow
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

PREFIX = "chromalab-"
CHAMPION = "champion"
CHALLENGER = "challenger"
RANK_METRIC = "delta_e00"  # lower is better
# Version tags
TAG_DVC_EXPERIMENT = "dvc_experiment"
TAG_GIT_COMMIT = "git_commit"
TAG_DATASET_DIGEST = "dataset_digest"
TAG_TEST_SET = "test_set_digest"


def registered_name(model_name: str) -> str:
    return f"{PREFIX}{model_name}"


def _client() -> mlflow.MlflowClient:
    import mlflow

    from chromalab.track import runs

    uri = runs.use_store()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_trained_model(model_name: str, logged: ModelInfo, dataset_digest: str) -> ModelVersion:
    """Register the model `logged` into the active training run as a new `chromalab-<model>` version (the
    run's own, if it has one already)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    from chromalab.track import runs

    client = _client()
    name = registered_name(model_name)
    if client.search_registered_models(f"name = '{name}'") == []:
        try:
            client.create_registered_model(
                name, description=f"chromalab's {model_name} colorizer. Its pyfunc takes photo files (column "
                                  "`image`: bytes or base64) and returns coloured JPEGs at full resolution; "
                                  f"`evaluate` sets @{CHAMPION} (lowest test ΔE00) and @{CHALLENGER} (newest).")
        except MlflowException as exc:  # another stage registered it meanwhile (parallel queue workers)
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    run = mlflow.active_run()
    # A run killed after registering, before DVC recorded the stage, finishes again: one version per run.
    registered = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if registered:
        return max(registered, key=lambda v: int(v.version))
    identity = runs.run_identity()
    tags = {TAG_DVC_EXPERIMENT: identity[runs.TAG_DVC_EXP_NAME], TAG_DATASET_DIGEST: dataset_digest,
            "model": model_name}
    if runs.TAG_GIT_COMMIT in identity:
        tags[TAG_GIT_COMMIT] = identity[runs.TAG_GIT_COMMIT]
    return client.create_model_version(name, logged.model_uri, run_id=run.info.run_id, tags=tags,
                                       model_id=logged.model_id)


def test_set_digest(ids: list[str], L: np.ndarray, ab: np.ndarray) -> str:
    """The identity of a test set: its photo ids and the exact Lab values the models were scored on."""
    import numpy as np

    digest = hashlib.sha256("\n".join(ids).encode())
    for array in (L, ab):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def record_evaluation(reports_root: Path, summary: dict[str, dict[str, float]], test_digest: str) -> dict:
    """Tag each evaluated model's version with its test metrics, then move the aliases; returns them.

    Models are found through the run id in reports/<model>/train_metrics.json; a model trained before the
    registry existed (no version for its run) is skipped.
    """
    from chromalab.track import runs

    client = _client()
    aliases = {}
    for model_name in MODEL_NAMES:
        run_id = runs.training_run_id(reports_root, model_name)
        if not run_id or model_name not in summary:
            continue
        name = registered_name(model_name)
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if not versions:
            continue
        version = max(versions, key=lambda v: int(v.version))
        scores = {f"test_{k}": v for k, v in summary[model_name].items() if k != "count"}
        for key, value in {**scores, TAG_TEST_SET: test_digest}.items():
            client.set_model_version_tag(name, version.version, key, str(value))
        aliases[model_name] = _move_aliases(client, name, test_digest)
    return aliases


def _move_aliases(client: mlflow.MlflowClient, name: str, test_digest: str) -> dict[str, str]:
    rank_tag = f"test_{RANK_METRIC}"
    comparable = [v for v in client.search_model_versions(f"name = '{name}'")
                  if v.tags.get(TAG_TEST_SET) == test_digest and rank_tag in v.tags]
    champion = min(comparable, key=lambda v: (float(v.tags[rank_tag]), int(v.version)))  # a tie keeps the elder
    challenger = max(comparable, key=lambda v: int(v.version))
    for alias, version in ((CHAMPION, champion), (CHALLENGER, challenger)):
        client.set_registered_model_alias(name, alias, version.version)
    return {CHAMPION: champion.version, CHALLENGER: challenger.version}
