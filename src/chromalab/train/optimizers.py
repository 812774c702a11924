"""Adam with TensorFlow's fused update kernel: the same arithmetic as Keras' Adam, in one pass over memory.

Keras 3's Adam updates each variable with about ten separate element-wise TensorFlow ops (m, v, sqrt,
divide, …), each a full pass over the variable and a temporary as large: for the full-size pix2pix pair
(57 M parameters) a large share of a CPU step (README, "Measured figures behind the code"), where
TensorFlow's `ResourceApplyAdam` kernel makes one pass. Its formula is Keras' own:
alpha = lr·√(1−β₂ᵗ)/(1−β₁ᵗ); m += (g−m)(1−β₁); v += (g²−v)(1−β₂); var −= alpha·m/(√v + ε).

Only the TensorFlow backend takes the fused path (dense float gradients, no AMSGrad); under JAX the whole
train step is one XLA program, which fuses the update by itself, so Keras' code runs unchanged. The
variables (momentums, velocities, iterations) are Keras' own, so checkpoints are the same as Adam's.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="chromalab")
class FusedAdam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices) or not variable.dtype.is_floating:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        # `variable` is the tf.Variable (or, under a tf.distribute strategy, this replica's copy);
        # the slots are Keras variables around tf.Variables placed beside it.
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


class ConstantThenLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """pix2pix's schedule: `rate` until the last `decay_steps` steps, then linearly down to zero.

    A function of the optimizer's step count, which the checkpoint restores: a resumed run continues the
    same curve.
    """

    def __init__(self, rate: float, total_steps: int, decay_steps: int):
        self.rate, self.total_steps, self.decay_steps = float(rate), int(total_steps), int(decay_steps)

    def __call__(self, step):
        remaining = ops.cast(self.total_steps, "float32") - ops.cast(step, "float32")
        return self.rate * ops.clip(remaining / self.decay_steps, 0.0, 1.0)

    def get_config(self) -> dict:
        return {"rate": self.rate, "total_steps": self.total_steps, "decay_steps": self.decay_steps}


def learning_rate(p, steps_per_epoch: int):
    """The model's rate: constant, or constant then decaying to zero over its last `decay_epochs`."""
    if not p.n_decay_epochs:
        return p.learning_rate
    return ConstantThenLinearDecay(p.learning_rate, p.epochs * steps_per_epoch, p.n_decay_epochs * steps_per_epoch)
