"""Data parallelism for `fit`: across the processes TF_CONFIG names (JAX), or across several local devices."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import keras

from chromalab.errors import ChromalabError

UPSTREAM_MULTI_WORKER_BUG = "keras-team/keras#20585"


def cluster_from_tf_config() -> tuple[list[str], int] | None:
    """TF_CONFIG's tasks as (addresses, this process's index), the chief first, then the workers in order."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster = config["cluster"]
        tasks = [(kind, index) for kind in ("chief", "worker") for index in range(len(cluster.get(kind, [])))]
        addresses = [cluster[kind][index] for kind, index in tasks]
        process_id = tasks.index((config["task"]["type"], int(config["task"]["index"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise ChromalabError(
            f"TF_CONFIG does not name this process in its cluster ({type(exc).__name__}: {exc}): set it to "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": N}}'
        ) from None
    return addresses, process_id


def make_strategy():
    """Data parallelism: across the processes TF_CONFIG names, or across several local devices; else None.

    JAX: keras.distribution.DataParallel over every device of every process; TF_CONFIG's first task is
    JAX's coordinator. TensorFlow: MirroredStrategy on several local GPUs; its multi-worker strategy
    can't run `fit` in Keras 3 (keras-team/keras#20585), so TF_CONFIG is refused there.
    """
    cluster = cluster_from_tf_config()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if cluster is not None:
            raise ChromalabError(
                f"multi-worker training (TF_CONFIG) fails under the TensorFlow backend ({UPSTREAM_MULTI_WORKER_BUG}): "
                "run each worker with KERAS_BACKEND=jax, or unset TF_CONFIG (several local GPUs still work)"
            )
        import tensorflow as tf

        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return None
    if backend != "jax":
        return None
    import jax

    if cluster is not None and not jax.distributed.is_initialized():
        addresses, process_id = cluster
        # Before any JAX computation; on CPU the processes exchange gradients through gloo (JAX's default).
        keras.distribution.initialize(",".join(addresses), len(addresses), process_id)
    if len(keras.distribution.list_devices()) > 1:
        # Each process feeds only its own rows of every global batch (chromalab.train.input), so Keras must
        # not shard the input again (it can only shard tf.data, which JAX runs do not use).
        return keras.distribution.DataParallel(auto_shard_dataset=False)
    return None


def replica_count(strategy) -> int:
    """How many model replicas share each global batch."""
    if strategy is None:
        return 1
    if isinstance(strategy, keras.distribution.DataParallel):
        return int(strategy.device_mesh.devices.size)
    return strategy.num_replicas_in_sync


def is_chief(strategy) -> bool:
    """Process 0 of a multi-process (JAX) run; any single-process run."""
    if isinstance(strategy, keras.distribution.DataParallel):
        import jax

        return jax.process_index() == 0
    return True


@contextmanager
def chief_logs_to_mlflow(strategy):
    """Other workers train in lockstep but log to a throwaway store (as Keras has them save to temp dirs)."""
    if is_chief(strategy):
        yield
        return
    from chromalab.track.runs import store_override

    with tempfile.TemporaryDirectory(prefix="chromalab-worker-") as scratch, \
            store_override(f"sqlite:///{scratch}/mlflow.db"):
        yield
