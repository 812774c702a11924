"""Losses and metrics: SSIM against scikit-image, MS-SSIM against TensorFlow and with finite gradients,
pix2pix losses against hand-computed values, mixed precision and the JAX backend."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from chromalab.train import losses
from chromalab.color import rgb_to_lab_norm
from chromalab.errors import ChromalabError
from chromalab.train.models import build_baseline, build_generator
from conftest import jax_env
from chromalab.bench.samples import real_crops


def real_ab(n: int, size: int, seed: int = 0) -> np.ndarray:
    """ab/128 of real photos, [n, size, size, 2] float32."""
    return np.stack([rgb_to_lab_norm(rgb)[..., 1:] for rgb in real_crops(n, size, seed)])


def degraded(ab: np.ndarray, blur: float, noise: float, seed: int = 0) -> np.ndarray:
    """A plausible prediction: blurred, noisy, clipped to tanh's range."""
    rng = np.random.default_rng(seed)
    out = gaussian(ab, sigma=(0, blur, blur, 0)) + rng.normal(0, noise, ab.shape)
    return np.clip(out, -1, 1).astype(np.float32)


def skimage_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    return np.array([
        structural_similarity(x.astype(np.float64), y.astype(np.float64), gaussian_weights=True, sigma=sigma,
                              use_sample_covariance=False, data_range=2.0, channel_axis=-1)
        for x, y in zip(a, b)
    ])


# --- SSIM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blur,noise", [(0.0, 0.02), (1.5, 0.05), (3.0, 0.2)])
def test_ssim_matches_skimage_on_real_photos(blur, noise):
    true = real_ab(4, 64)
    pred = degraded(true, blur, noise)
    ours = np.asarray(losses.ssim(true, pred))
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, skimage_ssim(true, pred), atol=1e-4)


def test_ssim_matches_skimage_on_random_images():
    rng = np.random.default_rng(7)
    a, b = rng.uniform(-1, 1, (2, 3, 40, 48, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(losses.ssim(a, b)), skimage_ssim(a, b), atol=1e-4)


def test_ssim_shrinks_the_window_for_images_smaller_than_it():
    # 8 px < 11 taps: a 7-tap window with σ = 1.5·7/11, which skimage builds from that σ (radius 3.5σ → 3).
    true = real_ab(3, 8)
    pred = degraded(true, 0.0, 0.1)
    expected = skimage_ssim(true, pred, sigma=1.5 * 7 / 11)
    np.testing.assert_allclose(np.asarray(losses.ssim(true, pred)), expected, atol=1e-4)


def test_ms_ssim_matches_tensorflow_where_tensorflow_works():
    # tf.image.ssim_multiscale (the seed's loss) needs ≥ 176 px for its 5 scales; at 256 px we use 5 too.
    true = real_ab(2, 256, seed=3)
    pred = degraded(true, 1.0, 0.05)
    expected = tf.image.ssim_multiscale(true, pred, max_val=2.0).numpy()
    np.testing.assert_allclose(np.asarray(losses.ms_ssim(true, pred)), expected, atol=1e-3)


@pytest.mark.parametrize("size,scales", [(16, 1), (32, 2), (64, 3), (128, 4), (175, 4), (176, 5), (512, 5)])
def test_ms_ssim_scale_count_keeps_the_coarsest_scale_at_least_as_large_as_the_window(size, scales):
    assert losses.ms_ssim_scales(size) == scales
    assert size // 2 ** (scales - 1) >= losses.SSIM_FILTER_SIZE or scales == 1


@pytest.mark.parametrize("loss", [losses.ssim_loss, losses.ms_ssim_loss])
def test_ssim_losses_are_zero_for_identical_images_and_grow_with_damage(loss):
    true = real_ab(3, 64, seed=5)
    np.testing.assert_allclose(np.asarray(loss(true, true)), 0.0, atol=1e-6)
    values = [float(np.mean(loss(true, degraded(true, blur, noise)))) for blur, noise in
              [(0.5, 0.01), (1.5, 0.05), (3.0, 0.2)]]
    assert 0 < values[0] < values[1] < values[2] <= 2


def _finite_nonzero(grads) -> bool:
    grads = [np.asarray(g) for g in grads]
    return all(np.all(np.isfinite(g)) for g in grads) and any(np.any(g != 0) for g in grads)


@pytest.mark.parametrize("size", [32, 256])
def test_ms_ssim_gradients_are_finite_for_a_fresh_model(size):
    keras.utils.set_random_seed(0)
    model = build_baseline(size, width=0.125)
    true = real_ab(2, size, seed=1)
    L = np.random.default_rng(0).uniform(0, 1, (2, size, size, 1)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(losses.ms_ssim_loss(true, model(L, training=True)))
    assert np.isfinite(float(loss))
    assert _finite_nonzero(tape.gradient(loss, model.trainable_weights))


def test_ms_ssim_value_and_gradient_are_finite_where_the_contrast_term_is_negative():
    # Anti-correlated noise: cs < 0 at the finest scale. Unclamped, its fractional power is NaN; clamped
    # at 0 only (tf.image.ssim_multiscale), the gradient is inf × 0 = NaN.
    true = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 2)).astype(np.float32)
    pred = tf.Variable(-true)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(losses.ms_ssim_loss(true, pred))
    assert 0.5 < float(loss) <= 1.0
    assert np.all(np.isfinite(tape.gradient(loss, pred).numpy()))


def test_ssim_metric_and_loss_average_over_a_dataset_in_compile():
    keras.utils.set_random_seed(0)
    model = build_generator(32, width=0.125)
    model.compile(loss=losses.ssim_loss, metrics=[losses.ssim_metric])
    L = np.random.default_rng(1).uniform(0, 1, (5, 32, 32, 1)).astype(np.float32)
    true = real_ab(5, 32, seed=4)
    scores = model.evaluate(L, true, batch_size=2, verbose=0, return_dict=True)  # batches 2, 2, 1
    per_image = np.asarray(losses.ssim(true, model.predict(L, verbose=0)))
    assert scores["ssim_metric"] == pytest.approx(per_image.mean(), abs=1e-5)
    assert scores["loss"] == pytest.approx(1 - per_image.mean(), abs=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_losses_compute_in_float32_for_mixed_precision_outputs(dtype):
    true = real_ab(2, 32, seed=6)
    pred = degraded(true, 1.0, 0.05)
    low = keras.ops.cast(pred, dtype)
    for fn in (losses.ssim, losses.ms_ssim):
        out = fn(true, low)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        reference = fn(true, np.asarray(keras.ops.cast(low, "float32")))  # same rounded pixels, in float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-6)
    total, _, _ = losses.generator_loss(keras.ops.cast(np.ones((2, 2, 2, 1)), dtype), true, low, 100.0)
    assert keras.backend.standardize_dtype(total.dtype) == "float32"


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ChromalabError, match="image batches"):
        losses.ssim(np.zeros((8, 8, 2)), np.zeros((8, 8, 2)))
    with pytest.raises(ChromalabError, match="max_val"):
        losses.ssim(np.zeros((1, 8, 8, 2)), np.zeros((1, 8, 8, 2)), max_val=0)
    with pytest.raises(ChromalabError, match="l1_lambda"):
        losses.generator_loss(np.zeros((1, 2, 2, 1)), np.zeros((1, 8, 8, 2)), np.zeros((1, 8, 8, 2)), -1.0)


# --- pix2pix losses ------------------------------------------------------------------------------------


def bce(label: float, logit: float) -> float:
    """Binary cross-entropy of one logit, written out: −[y log σ(z) + (1 − y) log(1 − σ(z))]."""
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


REAL_LOGITS = np.array([3.0, -1.0, 0.5, 0.0, 2.0, -4.0, 1.5, -0.5], np.float32).reshape(2, 2, 2, 1)
FAKE_LOGITS = np.array([-2.0, 1.0, 0.0, -0.5, 4.0, -3.0, 0.25, 1.0], np.float32).reshape(2, 2, 2, 1)


def test_generator_loss_against_hand_computed_values():
    real = np.array([0.5, -0.25, 0.0, 1.0], np.float32).reshape(1, 2, 1, 2)
    fake = np.array([0.25, 0.25, -0.5, 1.0], np.float32).reshape(1, 2, 1, 2)
    total, adversarial, l1 = (float(v) for v in losses.generator_loss(FAKE_LOGITS, real, fake, l1_lambda=100.0))
    expected_adv = np.mean([bce(1, z) for z in FAKE_LOGITS.ravel()])
    expected_l1 = (0.25 + 0.5 + 0.5 + 0.0) / 4
    assert adversarial == pytest.approx(expected_adv, rel=1e-5)
    assert l1 == pytest.approx(expected_l1, rel=1e-6)
    assert total == pytest.approx(expected_adv + 100.0 * expected_l1, rel=1e-5)
    assert float(losses.generator_loss(FAKE_LOGITS, real, real, 100.0)[2]) == 0.0


def test_discriminator_loss_against_hand_computed_values():
    expected = 0.5 * (np.mean([bce(1, z) for z in REAL_LOGITS.ravel()])
                      + np.mean([bce(0, z) for z in FAKE_LOGITS.ravel()]))
    assert float(losses.discriminator_loss(REAL_LOGITS, FAKE_LOGITS)) == pytest.approx(expected, rel=1e-5)


def test_gan_losses_are_stable_for_large_logits():
    confident = np.full((1, 2, 2, 1), 200.0, np.float32)  # a naive log(sigmoid) gives inf here
    assert float(losses.discriminator_loss(confident, -confident)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.generator_loss(-confident, np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 2)), 100.0)[1]) \
        == pytest.approx(200.0, rel=1e-5)


# --- JAX -----------------------------------------------------------------------------------------------


JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    from chromalab.entry import skip_unused_extras; skip_unused_extras()  # first: Keras then skips its unused imports
    import jax, keras, numpy as np
    from chromalab.train import losses
    assert keras.backend.backend() == "jax"
    data = np.load(sys.argv[1])
    true, pred = data["true"], data["pred"]
    # Jitted, as training runs them: eager JAX compiles every op on its own (~6 of this script's ~10 CPU-s).
    grad = jax.jit(jax.grad(lambda p: keras.ops.mean(losses.ms_ssim_loss(true, p))))(-true)  # cs < 0 everywhere
    print(json.dumps({
        "ssim": np.asarray(jax.jit(losses.ssim)(true, pred)).tolist(),
        "ms_ssim": np.asarray(jax.jit(losses.ms_ssim)(true, pred)).tolist(),
        "generator": [float(v) for v in jax.jit(losses.generator_loss, static_argnums=3)(data["fake_logits"], true, pred, 100.0)],
        "discriminator": float(jax.jit(losses.discriminator_loss)(data["real_logits"], data["fake_logits"])),
        "grad_finite": bool(np.all(np.isfinite(np.asarray(grad)))),
    }))
""")


@pytest.fixture(scope="module", autouse=True)
def jax_run(tmp_path_factory):
    """JAX_SCRIPT on fixed data, started with the module: its imports and compiles overlap the other tests."""
    true = real_ab(2, 32, seed=8)
    pred = degraded(true, 1.0, 0.05)
    data = tmp_path_factory.mktemp("jax-losses") / "data.npz"
    np.savez(data, true=true, pred=pred, real_logits=REAL_LOGITS, fake_logits=FAKE_LOGITS)
    proc = subprocess.Popen([sys.executable, "-c", JAX_SCRIPT, str(data)], env=jax_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, true, pred
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_losses_agree_under_jax(jax_run):
    proc, true, pred = jax_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["ssim"], np.asarray(losses.ssim(true, pred)), atol=1e-5)
    np.testing.assert_allclose(result["ms_ssim"], np.asarray(losses.ms_ssim(true, pred)), atol=1e-5)
    np.testing.assert_allclose(result["generator"], [float(v) for v in losses.generator_loss(FAKE_LOGITS, true, pred, 100.0)],
                               rtol=1e-5)
    expected_d = float(losses.discriminator_loss(REAL_LOGITS, FAKE_LOGITS))
    assert result["discriminator"] == pytest.approx(expected_d, rel=1e-5)
    assert result["grad_finite"]
