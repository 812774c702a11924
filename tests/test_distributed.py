"""Several processes train one model: under JAX (keras.distribution.DataParallel over gloo on CPU) two
processes on 127.0.0.1 end in step; under TensorFlow, TF_CONFIG is refused in one line (keras#20585)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import yaml

from chromalab.train.epochs import epoch_order
from chromalab.errors import ChromalabError
from chromalab.data.dataset import load_split_arrays
from chromalab.train.checkpoint import read_history
from chromalab.train.stage import run_train
from conftest import _free_port, jax_env
from test_training import TINY, dataset, tiny_params, workdir  # noqa: F401  (fixtures)

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    from chromalab.entry import skip_unused_extras; skip_unused_extras()  # first: Keras then skips its unused imports
    import jax, keras, numpy as np
    from chromalab.entry import exit_without_teardown
    from chromalab.config import load_params
    from chromalab.train import input as training_input
    from chromalab.train.checkpoint import read_history
    from chromalab.train.stage import run_train
    me = Path(f"worker{sys.argv[1]}")
    me.mkdir()

    # What this process reads for fit, photo by photo in order (one reader thread): a fingerprint of each
    # photo's ab as stored, before the augmentation.
    decode = training_input.decode_photo
    def recording(*args):
        photo = decode(*args)
        with open(me / "fed.jsonl", "a") as f:
            f.write(json.dumps(hashlib.sha256(np.asarray(photo[2], np.float32).tobytes()).hexdigest()[:12]) + "\\n")
        return photo
    training_input.decode_photo = recording

    run_train(load_params(), "gan", models_root=me / "models", reports_root=me / "reports")
    model = keras.saving.load_model(me / "models/gan/model.keras")
    np.save(me / "weights.npy", np.concatenate([np.ravel(w) for w in model.get_weights()]))
    # Trained, saved and loaded under JAX: nothing needed TensorFlow (installed here, unlike the GPU machine).
    (me / "tensorflow_imported").write_text(str("tensorflow" in sys.modules))
    # All is written: leave the cluster, then end as `chromalab` does, without the interpreter's teardown.
    jax.distributed.shutdown()
    exit_without_teardown()
""")


def _tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def test_two_jax_processes_on_localhost_train_one_model_in_step(workdir, dataset):
    """Each process reads its half of every global batch; both end with identical weights, and only
    process 0 logs to the repository's MLflow store."""
    epochs, global_batch = 2, 4
    (workdir / "params.yaml").write_text(yaml.safe_dump(
        {**TINY, "train": {**TINY["train"], "val_every": 100, "sample_every": 100},
         "gan": {**TINY["gan"], "epochs": epochs, "batch_size": global_batch // 2}}))
    addresses = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i)], cwd=workdir, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**jax_env(), "TF_CONFIG": _tf_config(addresses, i)})
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=600)[0] for w in workers]  # a loaded 2-core machine: two JAX compiles
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-2500:] for o in outputs)
    # Identical weights alone would also come from two unsynchronised runs with the same seed: each process
    # must have been fed its own half of each global batch that one process would have taken.
    _, _, train_ab = load_split_arrays(dataset, "train")
    photo = [hashlib.sha256(ab.tobytes()).hexdigest()[:12] for ab in train_ab]
    seed, n_photos = tiny_params().base.seed, len(photo)
    steps = n_photos // global_batch
    for rank in range(2):
        own = []  # this process's half of each global batch, step after step
        for epoch in range(epochs):
            order = epoch_order(seed, epoch, n_photos)
            for step in range(steps):
                whole = [photo[i] for i in order[step * global_batch:(step + 1) * global_batch]]
                own += whole[rank * global_batch // 2:(rank + 1) * global_batch // 2]
        fed = [json.loads(line) for line in (workdir / f"worker{rank}/fed.jsonl").read_text().splitlines()]
        assert fed[:len(own)] == own, rank  # beyond: the batch read ahead when training ended
    assert len(set(photo)) == n_photos  # the fingerprints tell every photo apart, so the check above can fail
    process0, process1 = (np.load(workdir / f"worker{i}/weights.npy") for i in range(2))
    np.testing.assert_array_equal(process0, process1)
    assert [(workdir / f"worker{i}/tensorflow_imported").read_text() for i in range(2)] == ["False", "False"]
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
