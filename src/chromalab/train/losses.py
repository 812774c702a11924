"""Losses and metrics on ab (a/128, b/128 in [-1, 1]), in `keras.ops` only, so they run on any backend.

- `ssim`: per-image SSIM of Wang et al. (2004), channels averaged: Gaussian 11-tap window (σ = 1.5),
  valid convolution, K1 = 0.01, K2 = 0.03, population covariance. This is `tf.image.ssim` and
  `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`,
  which chromalab.evaluate.metrics uses at evaluation, so training and evaluation numbers agree.
  `max_val` is 2.0: the range of ab. An image smaller than the window gets a smaller odd window with σ
  shrunk in proportion (the same ±3.3σ support), rather than an error.
- `ms_ssim`: multi-scale SSIM (Wang et al. 2003) with the standard weights, in a numerically safe form:
  `tf.image.ssim_multiscale` (the seed's loss) raises a contrast term that can be ≤ 0 to a fractional
  power, whose gradient is then inf × 0 = NaN from the first step. Here every factor is clamped to
  ≥ MS_SSIM_EPS before the power. The number of scales adapts to the image: as many (up to 5) as keep the
  coarsest scale at least as large as the window (5 from 176 px, 2 at 32 px), weights renormalised.
- `ssim_loss`, `ms_ssim_loss`: 1 − (MS-)SSIM per image; Keras' loss reduction averages them over the
  batch, so the loss is 1 − mean SSIM (and sample weights work).
- pix2pix GAN losses: `generator_loss`, `discriminator_loss`, binary cross-entropy on logits.
- Metrics for `model.compile(metrics=[...])`: `ssim_metric` (SSIM per image; the metric wrapper keeps
  the running mean). MSE and MAE on ab are Keras' built-ins: `keras.metrics.MeanSquaredError()` and
  `keras.metrics.MeanAbsoluteError()`.

Every function casts its inputs to float32 first: mixed-precision models may hand over float16 or
bfloat16, whose 8–11-bit mantissas cannot hold SSIM's variance differences or small losses.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

from chromalab.config import PIX2PIX_L1_LAMBDA
from chromalab.errors import ChromalabError

AB_RANGE = 2.0  # ab/128 spans [-1, 1]
SSIM_FILTER_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003), fine → coarse
MS_SSIM_EPS = 1e-6  # floor of each factor before its fractional power: finite value and gradient
RECON_LOSSES = ("l1", "ssim_l1")
SSIM_L1_ALPHA = 0.84  # Zhao, Gallo, Frosio & Kautz (2017), "Loss functions for image restoration"


# --- SSIM ---------------------------------------------------------------------------------------------


def _as_float32_images(y_true, y_pred):
    y_true, y_pred = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
    if len(y_true.shape) != 4 or len(y_pred.shape) != 4:
        raise ChromalabError(f"SSIM needs image batches [B, H, W, C]; got shapes {tuple(y_true.shape)} "
                             f"and {tuple(y_pred.shape)}")
    return y_true, y_pred


def _static_size(y_true, y_pred) -> tuple[int | None, int | None]:
    """(H, W) where known at trace time: from the target (data of a fixed size) or else the prediction."""
    for image in (y_true, y_pred):
        height, width = image.shape[1], image.shape[2]
        if height is not None and width is not None:
            return int(height), int(width)
    return None, None


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of `size` taps (the 2-D window is its outer product)."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-(coords**2) / (2.0 * sigma**2))
    return window / window.sum()


def _window_for(height: int | None, width: int | None, filter_size: int, sigma: float) -> tuple[int, float]:
    """The window that fits the image: the requested one, or the largest odd one that fits, σ in proportion."""
    smallest = min(d for d in (height, width, filter_size) if d is not None)
    if smallest >= filter_size:
        return filter_size, sigma
    size = smallest if smallest % 2 else smallest - 1
    return size, sigma * size / filter_size


def _blur(images, size: int, sigma: float):
    """Separable Gaussian blur, valid region only: a depthwise column pass, then a row pass."""
    channels = images.shape[-1]
    window = gaussian_window(size, sigma).astype(np.float32)
    column = ops.convert_to_tensor(np.tile(window.reshape(size, 1, 1, 1), (1, 1, channels, 1)))
    row = ops.convert_to_tensor(np.tile(window.reshape(1, size, 1, 1), (1, 1, channels, 1)))
    return ops.depthwise_conv(ops.depthwise_conv(images, column, padding="valid"), row, padding="valid")


def _ssim_and_contrast_structure(x, y, max_val: float, filter_size: int, sigma: float):
    """Per-channel mean SSIM and mean contrast-structure term cs, both [B, C]."""
    size, sigma = _window_for(*_static_size(x, y), filter_size, sigma)
    channels = x.shape[-1]
    # One blur for all five local moments: E[x], E[y], E[x²], E[y²], E[xy].
    moments = _blur(ops.concatenate([x, y, x * x, y * y, x * y], axis=-1), size, sigma)
    mu_x, mu_y, e_xx, e_yy, e_xy = (moments[..., i * channels:(i + 1) * channels] for i in range(5))
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (SSIM_K1 * max_val) ** 2
    c2 = (SSIM_K2 * max_val) ** 2
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2.0 * cov_xy + c2) / (var_x + var_y + c2)
    return (ops.mean(luminance * contrast_structure, axis=(1, 2)),
            ops.mean(contrast_structure, axis=(1, 2)))


def _check_ssim_args(max_val: float, filter_size: int, sigma: float) -> None:
    if not (max_val > 0 and sigma > 0 and isinstance(filter_size, int) and filter_size >= 1):
        raise ChromalabError(f"SSIM needs max_val > 0, sigma > 0 and an integer filter_size >= 1; got "
                             f"max_val={max_val!r}, filter_size={filter_size!r}, sigma={sigma!r}")


def ssim(y_true, y_pred, max_val: float = AB_RANGE, filter_size: int = SSIM_FILTER_SIZE,
         sigma: float = SSIM_SIGMA):
    """SSIM of each image pair, averaged over channels: [B, H, W, C] × 2 → [B]."""
    _check_ssim_args(max_val, filter_size, sigma)
    y_true, y_pred = _as_float32_images(y_true, y_pred)
    per_channel, _ = _ssim_and_contrast_structure(y_true, y_pred, max_val, filter_size, sigma)
    return ops.mean(per_channel, axis=-1)


def ms_ssim_scales(image_size: int, filter_size: int = SSIM_FILTER_SIZE) -> int:
    """How many scales MS-SSIM uses: up to 5, each halving, the coarsest still ≥ the window (2 at 32 px)."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and image_size // 2**scales >= filter_size:
        scales += 1
    return scales


def ms_ssim(y_true, y_pred, max_val: float = AB_RANGE, filter_size: int = SSIM_FILTER_SIZE,
            sigma: float = SSIM_SIGMA):
    """Multi-scale SSIM of each image pair, averaged over channels: [B, H, W, C] × 2 → [B].

    Π_i cs_i^w_i over the finer scales times ssim^w_n at the coarsest, each factor clamped to
    ≥ MS_SSIM_EPS: value and gradient stay finite, and a clamped factor passes no gradient (as ReLU's
    would). Each scale halves the images by 2×2 average pooling (an odd last row/column is dropped).
    """
    _check_ssim_args(max_val, filter_size, sigma)
    y_true, y_pred = _as_float32_images(y_true, y_pred)
    height, width = _static_size(y_true, y_pred)
    if height is None:
        raise ChromalabError("MS-SSIM needs images of a size known when the model is built "
                             "(build the model with a fixed image_size)")
    n_scales = ms_ssim_scales(min(height, width), filter_size)
    weights = np.asarray(MS_SSIM_WEIGHTS[:n_scales], dtype=np.float32)
    weights /= weights.sum()
    factors = []
    for scale in range(n_scales):
        ssim_c, cs_c = _ssim_and_contrast_structure(y_true, y_pred, max_val, filter_size, sigma)
        if scale < n_scales - 1:
            factors.append(cs_c)
            y_true = ops.average_pool(y_true, 2, strides=2, padding="valid")
            y_pred = ops.average_pool(y_pred, 2, strides=2, padding="valid")
        else:
            factors.append(ssim_c)
    factors = ops.maximum(ops.stack(factors, axis=-1), MS_SSIM_EPS)  # [B, C, scales]
    per_channel = ops.prod(ops.power(factors, ops.convert_to_tensor(weights)), axis=-1)
    return ops.mean(per_channel, axis=-1)


def ssim_loss(y_true, y_pred):
    """1 − SSIM per image ([B]); Keras' loss reduction makes it 1 − mean SSIM over the batch."""
    return 1.0 - ssim(y_true, y_pred)


def ms_ssim_loss(y_true, y_pred):
    """1 − MS-SSIM per image ([B]), numerically safe (finite gradients); see `ms_ssim`."""
    return 1.0 - ms_ssim(y_true, y_pred)


def ssim_metric(y_true, y_pred):
    """SSIM per image on ab ([B]) for `compile(metrics=[...])`: Keras' metric wrapper averages it."""
    return ssim(y_true, y_pred)


# --- pix2pix GAN losses -----------------------------------------------------------------------------


def _bce_with_logits(target: float, logits):
    """Mean binary cross-entropy of every logit against a constant label (0 = fake, 1 = real)."""
    logits = ops.cast(logits, "float32")
    # keras.ops' version is element-wise (no hidden reduction) and stable for large |logits|.
    return ops.mean(ops.binary_crossentropy(ops.full_like(logits, target), logits, from_logits=True))


def reconstruction_loss(real_ab, fake_ab, kind: str = "l1"):
    """How far the colours are from the truth → (loss, l1). "l1": mean |real − fake| (pix2pix).
    "ssim_l1": α·(1 − SSIM) + (1 − α)·L1 with α = 0.84 (Zhao et al. 2017): SSIM keeps local structure (no
    blotches of one hue where the truth varies), L1 keeps the mean colour that SSIM alone lets drift."""
    real_ab, fake_ab = ops.cast(real_ab, "float32"), ops.cast(fake_ab, "float32")
    l1 = ops.mean(ops.abs(real_ab - fake_ab))
    if kind == "l1":
        return l1, l1
    if kind == "ssim_l1":
        return SSIM_L1_ALPHA * ops.mean(ssim_loss(real_ab, fake_ab)) + (1.0 - SSIM_L1_ALPHA) * l1, l1
    raise ChromalabError(f"reconstruction loss must be one of {', '.join(RECON_LOSSES)}, got {kind!r}")


def generator_loss(fake_logits, real_ab, fake_ab, l1_lambda: float, recon: str = "l1"):
    """pix2pix generator loss → (total, adversarial, l1): BCE(D(fake), real) + λ · reconstruction.
    `fake_logits` None: the reconstruction alone (generator pretraining), adversarial term 0."""
    if not (isinstance(l1_lambda, (int, float)) and math.isfinite(l1_lambda) and l1_lambda >= 0):
        raise ChromalabError(f"l1_lambda must be a number >= 0 (pix2pix: {PIX2PIX_L1_LAMBDA:g}), got {l1_lambda!r}")
    reconstruction, l1 = reconstruction_loss(real_ab, fake_ab, recon)
    if fake_logits is None:
        return reconstruction, ops.zeros_like(reconstruction), l1
    adversarial = _bce_with_logits(1.0, fake_logits)
    return adversarial + l1_lambda * reconstruction, adversarial, l1


def discriminator_loss(real_logits, fake_logits):
    """pix2pix discriminator loss: ½ (BCE(D(real), 1) + BCE(D(fake), 0)); halved so D learns at half G's rate."""
    return 0.5 * (_bce_with_logits(1.0, real_logits) + _bce_with_logits(0.0, fake_logits))
