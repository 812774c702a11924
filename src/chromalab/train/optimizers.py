"""Adam with TensorFlow's fused update kernel and a step count per variable (for G and D each their own).

Keras 3's Adam updates each variable with about ten separate element-wise TensorFlow ops (m, v, sqrt,
divide, …), each a full pass over the variable and a temporary as large: for the full-size pix2pix pair
(57 M parameters) a large share of a CPU step (README, "Measured figures behind the code"), where
TensorFlow's `ResourceApplyAdam` kernel makes one pass. Its formula is Keras' own:
alpha = lr·√(1−β₂ᵗ)/(1−β₁ᵗ); m += (g−m)(1−β₁); v += (g²−v)(1−β₂); var −= alpha·m/(√v + ε).

Only the TensorFlow backend takes the fused path (dense float gradients); under JAX the whole train step is
one XLA program, which fuses the same arithmetic, written in `keras.ops`, by itself. Beside Keras' own
variables (momentums, velocities, iterations) each variable has its update count, checkpointed with them.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="chromalab")
class FusedAdam(keras.optimizers.Adam):
    """Adam whose bias correction counts each variable's own updates, not the optimizer's steps.

    pix2pix gives G and D each their own Adam. One Adam over G ∪ D is the same only while both nets step on
    every batch: once one net trains alone (generator pretraining, then the discriminator's warm-up), the
    other's first update would see a step count in the thousands, skip Adam's bias correction and move
    1/√(1−β₂) ≈ 30× too far. A variable that gets no gradient (None) is not touched, its count included.
    """

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._updates = [self.add_variable((), initializer="zeros", dtype="float32", name="updates")
                         for _ in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            raise ValueError("FusedAdam does not implement amsgrad")
        index = self._get_variable_index(variable)
        self.assign_add(self._updates[index], 1.0)
        step = self._updates[index]
        if _can_fuse(gradient, variable):
            return self._fused_update(gradient, variable, learning_rate, index, step)
        dtype = variable.dtype
        lr, gradient, step = ops.cast(learning_rate, dtype), ops.cast(gradient, dtype), ops.cast(step, dtype)
        alpha = lr * ops.sqrt(1 - ops.power(ops.cast(self.beta_2, dtype), step)) / (
            1 - ops.power(ops.cast(self.beta_1, dtype), step))
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))
        self.assign_sub(variable, m * alpha / (ops.sqrt(v) + self.epsilon))

    def _fused_update(self, gradient, variable, learning_rate, index, step):
        import tensorflow as tf

        dtype = variable.dtype
        step = tf.cast(step, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        # `variable` is the tf.Variable (or, under a tf.distribute strategy, this replica's copy);
        # the slots are Keras variables around tf.Variables placed beside it.
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


def _can_fuse(gradient, variable) -> bool:
    """TensorFlow's kernel takes dense float gradients of TensorFlow variables."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not isinstance(gradient, tf.IndexedSlices) and variable.dtype.is_floating


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
