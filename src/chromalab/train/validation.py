"""How training judges itself on the val split: mean CIEDE2000, the rule the evaluate stage scores test by.

Keras' own validation (`fit`'s validation_data) gives SSIM, MSE and MAE on ab; ΔE00 needs Lab → a NumPy
computation (chromalab.color.delta_e00) on the net's predictions, done here at each validation. The lowest
val ΔE00 chooses the checkpoint that is exported (chromalab.train.checkpoint keeps its weights), so the test
split never takes part in any choice.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from chromalab.color import delta_e00, lab_from_norm

VAL_DELTA_E00 = "val_delta_e00"  # its key in the history rows, MLflow and train_metrics.json


def colorizer(model: keras.Model) -> keras.Model:
    """The net that colours (the GAN's generator or its moving average, or the baseline itself) as an inference model that shares
    its layers: what is exported, and what the best checkpoint's weights are saved from and loaded into
    (without the optimizer's state, which only the resumable checkpoint needs)."""
    trained = getattr(model, "colorizing_generator", model)
    return keras.Model(trained.input, trained.output, name=trained.name)


def predict_ab(net: keras.Model, L: np.ndarray, batch_size: int) -> np.ndarray:
    """The net's ab [N,S,S,2] float32 for L [N,S,S,1], `batch_size` photos at a time."""
    predictions = []
    for start in range(0, len(L), batch_size):
        batch = L[start:start + batch_size]
        # Under JAX a plain call runs op by op, each op compiled at its first use (seconds for a U-Net);
        # predict_on_batch compiles the whole call once. TensorFlow's eager ops need no compile.
        pred = net.predict_on_batch(batch) if keras.backend.backend() == "jax" else net(batch, training=False)
        predictions.append(np.asarray(ops.convert_to_numpy(pred), dtype=np.float32))
    return np.concatenate(predictions)


def mean_delta_e00(L: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray) -> float:
    """Mean over photos of each photo's mean CIEDE2000, on the prediction as the net gives it (before any gamut
    mapping), as the evaluate stage computes it. One photo at a time: a batch's float64 temporaries are large."""
    per_photo = [delta_e00(lab_from_norm(l_img[..., 0], t_ab), lab_from_norm(l_img[..., 0], p_ab))
                 for l_img, t_ab, p_ab in zip(L, true_ab, pred_ab)]
    return float(np.mean(per_photo))


def val_delta_e00(net: keras.Model, L: np.ndarray, true_ab: np.ndarray, batch_size: int) -> float:
    return mean_delta_e00(L, true_ab, predict_ab(net, L, batch_size))
