"""Several processes train one model: under JAX (keras.distribution.DataParallel over gloo on CPU) two
processes on 127.0.0.1 end in step; under TensorFlow, TF_CONFIG is refused in one line (keras#20585)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import yaml

from chromalab.errors import ChromalabError
from chromalab.training import read_history, run_train
from conftest import _free_port, jax_env
from test_training import TINY, dataset, tiny_params, workdir  # noqa: F401  (fixtures)

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np, keras
    from chromalab.config import load_params
    from chromalab.training import read_history, run_train
    me = Path(f"worker{sys.argv[1]}")
    run_train(load_params(), "gan", models_root=me / "models", reports_root=me / "reports")
    model = keras.saving.load_model(me / "models/gan/model.keras")
    np.save(me / "weights.npy", np.concatenate([np.ravel(w) for w in model.get_weights()]))
""")


def _tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def test_two_jax_processes_on_localhost_train_one_model_in_step(workdir):
    """Each process reads its half of every global batch; both end with identical weights, and only
    process 0 logs to the repository's MLflow store."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(
        {**TINY, "train": {**TINY["train"], "val_every": 100, "sample_every": 100},
         "gan": {**TINY["gan"], "epochs": 2, "batch_size": 2}}))
    addresses = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i)], cwd=workdir, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**jax_env(), "TF_CONFIG": _tf_config(addresses, i)})
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-2500:] for o in outputs)
    process0, process1 = (np.load(workdir / f"worker{i}/weights.npy") for i in range(2))
    np.testing.assert_array_equal(process0, process1)
    metrics = [json.loads((workdir / f"worker{i}/reports/gan/train_metrics.json").read_text()) for i in range(2)]
    assert metrics[0]["g_l1"] == metrics[1]["g_l1"]  # one loss: the mean over the global batch
    losses = [row["g_l1"] for row in read_history(workdir / "worker0/reports/gan/history.csv")]
    assert len(losses) == 2 and losses[0] != losses[1]  # it trained
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["gan.batch_size"] == "2"


def test_tensorflow_backend_refuses_tf_config_in_one_line(workdir, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0))
    with pytest.raises(ChromalabError, match=r"keras-team/keras#20585.*KERAS_BACKEND=jax") as caught:
        run_train(tiny_params(), "gan")
    assert "\n" not in str(caught.value)
    assert not (workdir / "models").exists()  # refused before any training


def test_a_tf_config_that_does_not_name_this_process_is_refused(workdir, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ChromalabError, match="TF_CONFIG does not name this process"):
        run_train(tiny_params(), "gan")
