"""pix2pix as a `keras.Model` (Keras 3 custom-train-step pattern), pure Keras: TensorFlow or JAX backend.

The generator is a U-Net (L → ab), the discriminator a 70×70 PatchGAN judging (L, ab) pairs
(chromalab.train.models). `fit` drives it; a metric tracker per loss term shows each in the progress bar.
"""

from __future__ import annotations

import contextlib
import warnings

import keras
from keras import ops

from chromalab.train import losses

VALIDATION_METRICS = ("ssim", "mse", "mae")  # on ab, as the seed reported them

# DeOldify's "NoGAN": the generator first learns alone on the reconstruction loss, then the discriminator alone
# learns to tell its outputs from the truth, then both train against each other, as pix2pix does throughout.
PRETRAIN, WARMUP, ADVERSARIAL = "pretrain", "warmup", "adversarial"
PHASES = (PRETRAIN, WARMUP, ADVERSARIAL)


def phase_plan(pretrain_epochs: int, warmup_epochs: int, epochs: int, start: int = 0) -> list[tuple[str, int, int]]:
    """The phases still to train from epoch `start`: [(phase, first epoch, end epoch)], empty ones left out."""
    bounds = (0, min(pretrain_epochs, epochs), min(pretrain_epochs + warmup_epochs, epochs), epochs)
    return [(phase, max(begin, start), end) for phase, begin, end in zip(PHASES, bounds, bounds[1:])
            if max(begin, start) < end]


def validation_trackers() -> dict[str, keras.metrics.Metric]:
    return {
        "ssim": keras.metrics.MeanMetricWrapper(losses.ssim_metric, name="ssim"),
        "mse": keras.metrics.MeanSquaredError(name="mse"),
        "mae": keras.metrics.MeanAbsoluteError(name="mae"),
    }


@contextlib.contextmanager
def _net_left_alone():
    """Quiet Keras' warning about variables without gradients: in pretraining and warm-up that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        yield


class Pix2Pix(keras.Model):
    """pix2pix: a U-Net generator (L → ab) against a PatchGAN discriminator judging (L, ab) pairs.

    One Adam serves both nets: pix2pix gives them identical Adam(2e-4, β1=0.5), Adam's moments are per
    variable, and both nets step once per batch, so one optimizer over G ∪ D (with G's gradients from the
    generator loss and D's from the discriminator loss) is exactly two optimizers — and it is the one
    `optimizer` that Keras checkpoints, distributes and threads through the JAX trainer.
    """

    def __init__(self, generator: keras.Model, discriminator: keras.Model, l1_lambda: float, recon: str = "l1",
                 ema: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.l1_lambda = l1_lambda
        self.recon = recon
        self.ema = ema
        if ema:
            # A moving average of the generator's weights (its own copy, never trained): what validation
            # judges and the stage exports, since the trained net itself jitters with each adversarial step.
            self.generator_ema = keras.models.clone_model(generator)
            self.generator_ema.set_weights(generator.get_weights())
            self.generator_ema.trainable = False
            self.ema_updates = self.add_weight(shape=(), initializer="zeros", trainable=False, name="ema_updates")
        # Which nets the next compiled step trains (PHASES); set between `fit` calls, read when the step is traced.
        self.phase = ADVERSARIAL
        self.loss_trackers = {
            name: keras.metrics.Mean(name=name) for name in ("g_loss", "g_gan", "g_l1", "d_loss")
        }
        self.val_trackers = validation_trackers()
        self.built = True  # both nets are Functional models, built at construction

    @property
    def metrics(self):
        return [*self.loss_trackers.values(), *self.val_trackers.values()]

    def call(self, L, training=False):
        return self.generator(L, training=training)

    @property
    def colorizing_generator(self) -> keras.Model:
        """The generator that colours: the moving average when `ema` is on, else the trained one."""
        return self.generator_ema if self.ema else self.generator

    def _ema_decay(self, updates):
        # TF's ExponentialMovingAverage warm-up (num_updates): early on the average follows the net closely,
        # so that a short run's average is not held back by the initial weights.
        return ops.minimum(self.ema, (1.0 + updates) / (10.0 + updates))

    def _ema_pairs(self):
        """(the generator's weight, its average) in layer order; non-trainable weights (BatchNorm's running
        statistics) are copied, not averaged."""
        return zip(self.generator.weights, self.generator_ema.weights)

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        self._phase = phase
        self.train_function = None  # the step is traced for one phase: the next fit traces it afresh

    @property
    def trains_generator(self) -> bool:
        return self.phase != WARMUP

    @property
    def trains_discriminator(self) -> bool:
        return self.phase != PRETRAIN

    def _forward(self, L, ab, g_call, d_call):
        """The losses of one batch, computing only what this phase trains: (g_total, g_gan, g_l1, d_loss)."""
        fake_ab = g_call(L)
        if not self.trains_discriminator:  # pretraining: the reconstruction alone, D untouched
            g_total, g_gan, g_l1 = losses.generator_loss(None, ab, fake_ab, self.l1_lambda, self.recon)
            return g_total, g_gan, g_l1, ops.zeros_like(g_total)
        real_logits, fake_logits = d_call(L, ab, fake_ab)
        g_total, g_gan, g_l1 = losses.generator_loss(fake_logits, ab, fake_ab, self.l1_lambda, self.recon)
        return g_total, g_gan, g_l1, losses.discriminator_loss(real_logits, fake_logits)

    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._jax_train_step(*args)
        return self._tf_train_step(*args)

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._jax_test_step(*args)
        L, ab, _ = keras.utils.unpack_x_y_sample_weight(args[0])
        fake_ab = ops.cast(self.colorizing_generator(L, training=False), "float32")
        for tracker in self.val_trackers.values():
            tracker.update_state(ab, fake_ab)
        return {name: tracker.result() for name, tracker in self.val_trackers.items()}

    # TensorFlow: one forward pass, a persistent tape, each net's gradient from its own loss.
    def _tf_train_step(self, data):
        import tensorflow as tf
        from keras.src.losses.loss import scale_loss_for_distribution  # what Keras' own train_step uses

        L, ab, _ = keras.utils.unpack_x_y_sample_weight(data)

        def d_call(L, ab, fake_ab):
            return self.discriminator([L, ab], training=True), self.discriminator([L, fake_ab], training=True)

        with tf.GradientTape(persistent=True) as tape:
            g_total, g_gan, g_l1, d_loss = self._forward(
                L, ab, lambda L: self.generator(L, training=self.trains_generator), d_call)
            # Replicas' gradients are summed by all-reduce: scale so that N replicas = one big batch.
            g_scaled, d_scaled = scale_loss_for_distribution(g_total), scale_loss_for_distribution(d_loss)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                g_scaled, d_scaled = self.optimizer.scale_loss(g_scaled), self.optimizer.scale_loss(d_scaled)
        g_vars, d_vars = self.generator.trainable_variables, self.discriminator.trainable_variables
        # A net this phase does not train gets None gradients: the optimizer leaves it, and its moments, alone.
        grads = (tape.gradient(g_scaled, g_vars) if self.trains_generator else [None] * len(g_vars)) + \
                (tape.gradient(d_scaled, d_vars) if self.trains_discriminator else [None] * len(d_vars))
        del tape
        with _net_left_alone():
            self.optimizer.apply(grads, g_vars + d_vars)
        if self.ema and self.trains_generator:
            decay = self._ema_decay(self.ema_updates)
            for weight, average in self._ema_pairs():
                average.assign(decay * average + (1.0 - decay) * weight if weight.trainable else weight)
            self.ema_updates.assign_add(1.0)
        for name, value in zip(self.loss_trackers, (g_total, g_gan, g_l1, d_loss)):
            self.loss_trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    # JAX: the same step, stateless (Keras 3 guide "custom train step in JAX").
    def _positions(self, variables, net: keras.Model, trainable: bool) -> list[int]:
        own = {id(v) for v in (net.trainable_variables if trainable else net.non_trainable_variables)}
        return [i for i, v in enumerate(variables) if id(v) in own]

    def _loss_scale(self, optimizer_vars):
        """float16: both losses are scaled by the current dynamic scale (as Keras' own JAX step does), and
        stateless_apply unscales, skips non-finite steps and adapts the scale; 1 otherwise."""
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return 1.0
        with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_vars))):
            return self.optimizer.scale_loss(1.0)

    def _jax_train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_vars, metrics_vars = state
        scale = self._loss_scale(optimizer_vars)
        L, ab, _ = keras.utils.unpack_x_y_sample_weight(data)
        tv, ntv = self.trainable_variables, self.non_trainable_variables
        g_t, d_t = self._positions(tv, self.generator, True), self._positions(tv, self.discriminator, True)
        g_n, d_n = self._positions(ntv, self.generator, False), self._positions(ntv, self.discriminator, False)
        pick = lambda values, idx: [values[i] for i in idx]  # noqa: E731

        def forward(g_train, d_train):
            nt = {"g": pick(non_trainable, g_n), "d": pick(non_trainable, d_n)}

            def g_call(L):
                fake_ab, nt["g"] = self.generator.stateless_call(g_train, nt["g"], L, training=self.trains_generator)
                return fake_ab

            def d_call(L, ab, fake_ab):
                real_logits, nt["d"] = self.discriminator.stateless_call(d_train, nt["d"], [L, ab], training=True)
                fake_logits, nt["d"] = self.discriminator.stateless_call(d_train, nt["d"], [L, fake_ab], training=True)
                return real_logits, fake_logits

            g_total, g_gan, g_l1, d_loss = self._forward(L, ab, g_call, d_call)
            return (g_total, d_loss), (g_gan, g_l1, nt["g"], nt["d"])

        (g_total, d_loss), pullback, (g_gan, g_l1, g_nt, d_nt) = jax.vjp(
            forward, pick(trainable, g_t), pick(trainable, d_t), has_aux=True)
        # Two pullbacks of one forward pass; under jit XLA drops the halves we don't use. A cotangent of
        # `scale` is the gradient of the scaled loss. A net this phase does not train gets None gradients.
        grads = [None] * len(trainable)
        for net, trains, positions, cotangents in (
                (0, self.trains_generator, g_t, (ops.full_like(g_total, scale), ops.zeros_like(d_loss))),
                (1, self.trains_discriminator, d_t, (ops.zeros_like(g_total), ops.full_like(d_loss, scale)))):
            if trains:
                for i, g in zip(positions, pullback(cotangents)[net]):
                    grads[i] = g
        with _net_left_alone():
            trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)
        non_trainable = list(non_trainable)
        for idx, values in ((g_n, g_nt), (d_n, d_nt)):
            for i, v in zip(idx, values):
                non_trainable[i] = v
        if self.ema and self.trains_generator:
            self._jax_update_ema(trainable, non_trainable)

        logs, new_metrics_vars, offset = {}, [], 0
        values = dict(zip(self.loss_trackers, (g_total, g_gan, g_l1, d_loss)))
        for metric in self.metrics:
            own = metrics_vars[offset : offset + len(metric.variables)]
            offset += len(metric.variables)
            if metric.name in values:
                own = metric.stateless_update_state(own, values[metric.name])
                logs[metric.name] = metric.stateless_result(own)
            new_metrics_vars += own
        return logs, (trainable, non_trainable, optimizer_vars, new_metrics_vars)

    def _jax_update_ema(self, trainable: list, non_trainable: list) -> None:
        """The TensorFlow step's average update, on the new state's values (in place)."""
        in_tv = {id(v): i for i, v in enumerate(self.trainable_variables)}
        in_ntv = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        count = in_ntv[id(self.ema_updates)]
        decay = self._ema_decay(non_trainable[count])
        for weight, average in self._ema_pairs():
            i = in_ntv[id(average)]
            if id(weight) in in_tv:
                non_trainable[i] = decay * non_trainable[i] + (1.0 - decay) * trainable[in_tv[id(weight)]]
            else:
                non_trainable[i] = non_trainable[in_ntv[id(weight)]]
        non_trainable[count] = non_trainable[count] + 1.0

    def _jax_test_step(self, state, data):
        trainable, non_trainable, metrics_vars = state
        L, ab, _ = keras.utils.unpack_x_y_sample_weight(data)
        tv, ntv, net = self.trainable_variables, self.non_trainable_variables, self.colorizing_generator
        g_t, g_n = self._positions(tv, net, True), self._positions(ntv, net, False)
        fake_ab, _ = net.stateless_call([trainable[i] for i in g_t], [non_trainable[i] for i in g_n],
                                                   L, training=False)
        fake_ab = ops.cast(fake_ab, "float32")
        logs, new_metrics_vars, offset = {}, [], 0
        for metric in self.metrics:
            own = metrics_vars[offset : offset + len(metric.variables)]
            offset += len(metric.variables)
            if metric.name in self.val_trackers:
                own = metric.stateless_update_state(own, ab, fake_ab)
                logs[metric.name] = metric.stateless_result(own)
            new_metrics_vars += own
        return logs, (trainable, non_trainable, new_metrics_vars)
