"""chromalab: learn to colour grayscale photos of people, reproducibly (DVC + MLflow)."""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

__version__ = "0.1.0"

# Keras and TensorFlow import scikit-learn, JAX and matplotlib's pyplot whenever they are installed, for
# integrations chromalab never uses (Keras's scikit-learn wrappers, image gallery and Orbax checkpoints, TF
# Lite's JAX converter): ~4 of the ~12 CPU-seconds every TensorFlow command spends importing, on 2 cores.
# Each of those imports is optional (guarded by `except ImportError`), so those integrations are simply off.
# Only these importers are refused: JAX as Keras's backend, MLflow, and chromalab's own plots import them.
UNUSED_EXTRAS = {  # module: the importers refused it
    "sklearn": ("keras.",),
    "matplotlib.pyplot": ("keras.",),
    "jax": ("tensorflow.", "keras.src.callbacks.orbax_checkpoint"),  # not the JAX backend's own import
    # Keras's optional TensorFlow (seeding tf.random, spotting tf.TensorShape when saving), which imports
    # TensorFlow under JAX too: ~5 CPU-s and its threads per process. The TensorFlow backend imported it already.
    "tensorflow": ("keras.src.utils.module_utils",),
}


# The frames between an import statement and a finder: Python's import machinery, and chromalab.quiet's import
# hook, which asks the finders after it on its importer's behalf.
IMPORT_MACHINERY = ("importlib", "_frozen_importlib", "chromalab.quiet")


class _SkipUnusedExtras(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        prefixes = UNUSED_EXTRAS.get(name)
        if prefixes is None:
            return None  # not ours to decide: the next finder looks for it
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(IMPORT_MACHINERY):
            frame = frame.f_back
        importer = "" if frame is None else frame.f_globals.get("__name__", "")
        if importer.startswith(prefixes):
            raise ModuleNotFoundError(f"{name} is not imported for {importer} (chromalab.UNUSED_EXTRAS)", name=name)
        return None


if not any(isinstance(finder, _SkipUnusedExtras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _SkipUnusedExtras())
