"""The model each training run fits, compiled as the params say: the baseline CNN or the pix2pix GAN."""

from __future__ import annotations

import keras

from chromalab.config import Params
from chromalab.train import losses
from chromalab.train.gan import Pix2Pix, validation_trackers
from chromalab.train.models import build_baseline, build_discriminator, build_generator
from chromalab.train.optimizers import FusedAdam, learning_rate


def build_for_training(model_name: str, params: Params, image_size: int, jit_compile: bool,
                       steps_per_epoch: int = 1) -> keras.Model:
    if model_name == "baseline":
        p = params.baseline
        model = build_baseline(image_size, width=p.width, dropout=p.dropout)
        loss = losses.ssim_loss if p.loss == "ssim" else losses.ms_ssim_loss
        optimizer = keras.optimizers.RMSprop(learning_rate(p, steps_per_epoch))
        model.compile(optimizer=optimizer, loss=loss, metrics=list(validation_trackers().values()),
                      jit_compile=jit_compile)
        return model
    p = params.gan
    gan = Pix2Pix(build_generator(image_size, width=p.width, norm=p.norm),
                  build_discriminator(image_size, width=p.width, spectral_norm=p.spectral_norm, diffaug=p.diffaug),
                  l1_lambda=p.l1_lambda, recon=p.recon_loss, ema=p.ema)
    # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer itself (auto_scale_loss).
    # FusedAdam: Keras' Adam in one kernel per variable on TensorFlow (a third of a CPU step, otherwise).
    gan.compile(optimizer=FusedAdam(learning_rate(p, steps_per_epoch), beta_1=p.beta_1),
                jit_compile=jit_compile)
    return gan
