"""The networks: architecture (counted independently from the papers' layer tables), sizes, widths,
FLOPs, saving, mixed precision and the JAX backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from chromalab.train import models
from chromalab.color import rgb_to_lab_norm
from chromalab.errors import ChromalabError
from chromalab.train.models import (
    baseline_train_step_flops,
    build_baseline,
    build_discriminator,
    build_generator,
    build_model,
    forward_flops,
    gan_train_step_flops,
)
from conftest import jax_env

TINY = 0.125  # channel width of the small models: 8 channels where the paper has 64


# --- independent parameter counts from the layer tables --------------------------------------------


def conv_params(kernel: int, c_in: int, c_out: int, bias: bool) -> int:
    return kernel * kernel * c_in * c_out + (c_out if bias else 0)


def bn_params(channels: int) -> int:
    return 4 * channels  # gamma, beta, moving mean, moving variance


def unet_params(c_in: int, c_out: int) -> int:
    """pix2pix U-Net-256 as tabulated in the TensorFlow tutorial (8 down, 7 up blocks, 4×4 kernels)."""
    down = [64, 128, 256, 512, 512, 512, 512, 512]
    up = [512, 512, 512, 512, 256, 128, 64]
    total, prev = 0, c_in
    for i, c in enumerate(down):
        total += conv_params(4, prev, c, bias=False) + (bn_params(c) if i else 0)
        prev = c
    for c, skip in zip(up, reversed(down[:-1])):
        total += conv_params(4, prev, c, bias=False) + bn_params(c)
        prev = c + skip  # concatenated with the skip
    return total + conv_params(4, prev, c_out, bias=True)


def patchgan_params(c_in: int) -> int:
    """pix2pix 70×70 PatchGAN: C64 (no BN), C128, C256, C512 stride 1, 1-channel output."""
    return (conv_params(4, c_in, 64, False) + conv_params(4, 64, 128, False) + bn_params(128)
            + conv_params(4, 128, 256, False) + bn_params(256) + conv_params(4, 256, 512, False)
            + bn_params(512) + conv_params(4, 512, 1, True))


def seed_cnn_params(c_in: int, c_out: int, down_kernel: int = 3) -> int:
    """The seed's Sequential CNN from the post: 3×3 convs with bias, BatchNorm after all but the last;
    `down_kernel` for its three stride-2 convs (ours are 4×4: symmetric padding, no one-sided edge)."""
    channels = [64, 64, 128, 128, 256, 256, 512, 512, 256, 128, 64, 32]
    stride_2 = {1, 3, 5}
    total, prev = 0, c_in
    for i, c in enumerate(channels):
        total += conv_params(down_kernel if i in stride_2 else 3, prev, c, bias=True) + bn_params(c)
        prev = c
    return total + conv_params(3, prev, c_out, bias=True)


def test_independent_counts_reproduce_the_published_numbers():
    # TensorFlow pix2pix tutorial summaries (3-channel images): generator 54,425,859, discriminator 2,770,433.
    assert unet_params(3, 3) == 54_425_859
    assert patchgan_params(6) == 2_770_433
    assert round(seed_cnn_params(1, 2) / 1e6, 2) == 6.26  # stack facts: the seed's CNN, 6.26 M


@pytest.fixture(scope="module")
def full_size():
    """The three networks at 256 px, width 1.0: built once (the U-Net alone holds 54 M weights)."""
    return {"baseline": build_baseline(256), "generator": build_generator(256),
            "discriminator": build_discriminator(256)}


def test_full_size_parameter_counts(full_size):
    assert full_size["baseline"].count_params() == seed_cnn_params(1, 2, down_kernel=4)
    assert full_size["generator"].count_params() == unet_params(1, 2)
    assert full_size["discriminator"].count_params() == patchgan_params(1 + 2)


def test_full_size_output_shapes(full_size):
    assert full_size["baseline"].output_shape == (None, 256, 256, 2)
    assert full_size["generator"].output_shape == (None, 256, 256, 2)
    assert full_size["discriminator"].output_shape == (None, 30, 30, 1)
    assert full_size["generator"].get_layer("down8_lrelu").output.shape == (None, 1, 1, 512)


def test_names_and_inputs(full_size):
    assert [m.name for m in full_size.values()] == ["baseline", "generator", "discriminator"]
    assert [t.name for t in full_size["discriminator"].inputs] == ["L", "ab"]
    assert [tuple(t.shape) for t in full_size["discriminator"].inputs] == [(None, 256, 256, 1), (None, 256, 256, 2)]


def test_pix2pix_layer_details():
    generator, discriminator = build_generator(64, TINY), build_discriminator(64, TINY)
    for model in (generator, discriminator):
        slopes = [layer.negative_slope for layer in model.layers if isinstance(layer, keras.layers.LeakyReLU)]
        assert slopes and all(slope == pytest.approx(0.2) for slope in slopes)
        for layer in model.layers:
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
                init = layer.kernel_initializer
                assert isinstance(init, keras.initializers.RandomNormal) and init.stddev == pytest.approx(0.02)
                # only the output layers carry a bias (BatchNorm follows the others)
                assert layer.use_bias == (layer.name in ("ab", "logits"))
    names = {layer.name for layer in generator.layers}
    assert "down1_bn" not in names and {f"down{i}_bn" for i in range(2, 7)} <= names
    assert {n for n in names if n.endswith("_dropout")} == {"up1_dropout", "up2_dropout", "up3_dropout"}
    assert generator.get_layer("ab").activation.__name__ == "tanh"


@pytest.mark.parametrize("size,depth", [(32, 5), (64, 6)])
def test_depth_follows_image_size_and_small_models_run(size, depth):
    generator, discriminator = build_generator(size, TINY), build_discriminator(size, TINY)
    downs = [layer for layer in generator.layers if layer.name.endswith("_conv") and layer.name.startswith("down")]
    assert len(downs) == depth
    assert downs[-1].output.shape[1:3] == (1, 1)
    rng = np.random.default_rng(0)
    L = rng.uniform(0, 1, (2, size, size, 1)).astype("float32")
    ab = np.asarray(generator(L, training=False))
    assert ab.shape == (2, size, size, 2) and np.all(np.abs(ab) <= 1)
    logits = np.asarray(discriminator([L, ab], training=False))
    patches = size // 8 - 2  # three halvings, then two 4×4 valid convs on 1-px padding
    assert logits.shape == (2, patches, patches, 1) and np.all(np.isfinite(logits))


def test_baseline_without_fixed_size_takes_any_multiple_of_8():
    model = build_baseline(None, TINY)
    assert model.input_shape == (None, None, None, 1)
    for size in (32, 48):
        out = np.asarray(model(np.zeros((1, size, size, 1), "float32"), training=False))
        assert out.shape == (1, size, size, 2)


def test_baseline_dropout_rate_is_the_seeds_unless_set():
    def rates(model):
        return [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

    assert rates(build_baseline(32, TINY)) == [0.5] * 3
    assert rates(build_baseline(32, TINY, dropout=0.0)) == [0.0] * 3


def test_width_scales_parameters_quadratically():
    # At 64 px (6 U-Net levels): the rule is about channels, and 256 px would build 54 M weights again.
    for build in (build_baseline, build_generator, build_discriminator):
        name = build.__name__.removeprefix("build_")
        ratio = build(64, 0.5).count_params() / build(64, 1.0).count_params()
        assert 0.24 < ratio < 0.26, (name, ratio)


def test_tiny_width_keeps_at_least_one_channel():
    model = build_generator(32, width=1e-3)
    convs = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    assert min(layer.kernel.shape[-1] for layer in convs) == 1
    assert np.asarray(model(np.zeros((1, 32, 32, 1), "float32"))).shape == (1, 32, 32, 2)


# --- borders: no one-sided edge ---------------------------------------------------------------------


def _mirror_symmetric_photo(size: int) -> np.ndarray:
    """Normalised L [1, S, S, 1] of a real photo crop, made left-right and top-bottom mirror symmetric."""
    from chromalab.bench.samples import real_crops

    quarter = rgb_to_lab_norm(real_crops(1, size // 2, seed=4)[0])[..., :1]
    half = np.concatenate([quarter, quarter[:, ::-1]], axis=1)
    return np.concatenate([half, half[::-1]], axis=0)[None]


def _symmetrise_kernels(model: keras.Model) -> None:
    """Average each kernel with its mirror images: the net then treats both sides alike, unless its padding
    or resampling does not."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            k = np.asarray(layer.kernel)
            layer.kernel.assign((k + k[::-1] + k[:, ::-1] + k[::-1, ::-1]) / 4)


def _border_gaps(image_size: int) -> tuple[np.ndarray, float, float]:
    keras.utils.set_random_seed(7)
    model = build_baseline(image_size, 0.25)
    _symmetrise_kernels(model)
    L = _mirror_symmetric_photo(image_size)
    ab = np.asarray(model(L, training=False), dtype=np.float64)[0]
    assert np.abs(ab).max() > 1e-6  # it predicts something, not a flat zero
    ab /= np.abs(ab).max()  # untrained outputs are small: compare on the scale of the largest
    chroma = np.hypot(ab[..., 0], ab[..., 1])
    cols = max(1, image_size * 10 // 64)  # the 10 columns of 64
    right_left = float(chroma[:, -cols:].mean() - chroma[:, :cols].mean())
    bottom_top = float(chroma[-cols:].mean() - chroma[:cols].mean())
    return ab, right_left, bottom_top


@pytest.mark.parametrize("image_size", [32, 64])
def test_baseline_treats_opposite_borders_alike_on_symmetric_input(image_size):
    ab, right_left, bottom_top = _border_gaps(image_size)
    np.testing.assert_allclose(ab, ab[:, ::-1], atol=1e-4)  # left-right mirror of itself
    np.testing.assert_allclose(ab, ab[::-1], atol=1e-4)  # top-bottom
    assert abs(right_left) < 1e-4 and abs(bottom_top) < 1e-4


def test_the_seeds_3x3_stride_2_padding_is_what_made_the_edge_one_sided(monkeypatch):
    # The same check fails for the seed's 3×3 stride-2 'same' convolutions (pad right/bottom only).
    monkeypatch.setattr(models, "BASELINE_DOWN_KERNEL", 3)
    ab, right_left, bottom_top = _border_gaps(64)
    assert np.abs(ab - ab[:, ::-1]).max() > 0.01 and np.abs(ab - ab[::-1]).max() > 0.01
    assert abs(right_left) > 1e-3 and abs(bottom_top) > 1e-3


def test_build_model_by_name():
    assert build_model("baseline", 32, TINY).name == "baseline"
    assert build_model("gan", 32, TINY).name == "generator"
    with pytest.raises(ChromalabError, match="unknown model 'unet'.*baseline, gan"):
        build_model("unet", 32, TINY)


@pytest.mark.parametrize("build,size,width", [
    (build_generator, 48, 1.0), (build_generator, 16, 1.0), (build_discriminator, 100, 1.0),
    (build_baseline, 30, 1.0), (build_generator, 32, 0.0), (build_baseline, 32, -1.0),
    (build_discriminator, 32, float("nan")),
])
def test_bad_sizes_and_widths_are_one_line_errors(build, size, width):
    with pytest.raises(ChromalabError) as err:
        build(size, width)
    assert "\n" not in str(err.value)


# --- FLOPs --------------------------------------------------------------------------------------------


def test_forward_flops_counts_each_layer_type_by_hand():
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)          # → 8×8×8
    y = keras.layers.BatchNormalization()(y)                            # not counted
    y = keras.layers.Conv2DTranspose(4, 4, strides=2, padding="same")(y)  # 8×8×8 → 16×16×4
    y = keras.layers.Dense(5)(y)                                        # 16×16×(4 → 5)
    model = keras.Model(x, y)
    conv = (8 * 8) * 8 * (3 * 3 * 3)
    transposed = (8 * 8 * 8) * (4 * 4 * 4)  # every input value meets a 4×4×4 kernel
    dense = (16 * 16) * 4 * 5
    assert forward_flops(model) == 2 * (conv + transposed + dense)


def test_forward_flops_sees_inside_nested_models():
    inner = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, padding="same")])
    x = keras.Input((8, 8, 2))
    assert forward_flops(keras.Model(x, inner(x))) == 2 * (8 * 8) * 4 * (3 * 3 * 2)


def test_forward_flops_follow_size_and_width():
    assert forward_flops(build_baseline(256, TINY)) == 4 * forward_flops(build_baseline(128, TINY))
    ratio = forward_flops(build_discriminator(64, 0.5)) / forward_flops(build_discriminator(64, 1.0))
    assert 0.24 < ratio < 0.27


def test_full_size_flops_match_the_reference_figures(full_size):
    # stack facts: U-Net-256 ≈ 6.0 GMAC, PatchGAN ≈ 3.2 GMAC, one GAN step ≈ 80 GFLOP per image.
    assert forward_flops(full_size["generator"]) == pytest.approx(12.0e9, rel=0.03)
    assert forward_flops(full_size["discriminator"]) == pytest.approx(6.4e9, rel=0.03)
    assert gan_train_step_flops(256, 1.0) == pytest.approx(80e9, rel=0.03)
    assert baseline_train_step_flops(256, 1.0) == 3 * forward_flops(full_size["baseline"])


def test_forward_flops_refuses_what_it_cannot_count():
    with pytest.raises(ChromalabError, match="fixed input size"):
        forward_flops(build_baseline(None, TINY))
    x = keras.Input((8, 8, 3))
    with pytest.raises(ChromalabError, match="DepthwiseConv2D"):
        forward_flops(keras.Model(x, keras.layers.DepthwiseConv2D(3)(x)))


# --- saving, mixed precision, JAX -------------------------------------------------------------------


def _tiny_models():
    keras.utils.set_random_seed(1)
    return {"baseline": build_baseline(32, TINY), "generator": build_generator(32, TINY),
            "discriminator": build_discriminator(32, TINY)}


def _inputs(model):
    """Fixed random inputs for each of the model's inputs: one array, or a list for the discriminator."""
    rng = np.random.default_rng(3)
    arrays = [rng.uniform(-1, 1, (2, *t.shape[1:])).astype("float32") for t in model.inputs]
    return arrays if len(arrays) > 1 else arrays[0]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Tiny models saved as .keras with their inference outputs, for the round trips."""
    folder = tmp_path_factory.mktemp("saved")
    out = {}
    for name, model in _tiny_models().items():
        path = folder / f"{name}.keras"
        model.save(path)
        out[name] = (path, _inputs(model), np.asarray(model(_inputs(model), training=False)))
    return out


def test_save_load_round_trip(saved_tiny):
    for name, (path, inputs, expected) in saved_tiny.items():
        loaded = keras.saving.load_model(path)  # plain: no custom_objects anywhere
        assert loaded.name == name
        np.testing.assert_allclose(np.asarray(loaded(inputs, training=False)), expected, atol=1e-6)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_mixed_precision_keeps_outputs_float32(mixed_bfloat16):
    for model in _tiny_models().values():
        first_conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
        assert first_conv.compute_dtype == "bfloat16"
        out = model(_inputs(model), training=False)
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        assert np.all(np.isfinite(np.asarray(out)))


JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    from chromalab.entry import skip_unused_extras; skip_unused_extras()  # first: Keras then skips its unused imports
    import jax, keras, numpy as np
    from chromalab.train.models import forward_flops
    assert keras.backend.backend() == "jax"

    def call(model, inputs, training):
        # The model's call jitted whole, as training and inference run it: eager JAX compiles every op alone.
        variables = [[v.value for v in vs] for vs in (model.trainable_variables, model.non_trainable_variables)]
        return jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=training)[0])(*variables, inputs)

    result = {"outputs": {}}
    models = {name: keras.saving.load_model(path) for name, path in json.loads(sys.argv[1]).items()}
    for name, model in models.items():
        rng = np.random.default_rng(3)
        inputs = [rng.uniform(-1, 1, (2, *t.shape[1:])).astype("float32") for t in model.inputs]
        inputs = inputs if len(inputs) > 1 else inputs[0]
        result["outputs"][name] = np.asarray(call(model, inputs, training=False)).tolist()
    result["flops"] = forward_flops(models["generator"])
    # training mode too: dropout and batch statistics
    L = keras.ops.convert_to_tensor(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 1)).astype("float32"))
    ab = call(models["generator"], L, training=True)
    logits = call(models["discriminator"], [L, ab], training=True)
    result["training"] = [float(keras.ops.max(keras.ops.abs(ab))), list(logits.shape)]
    print(json.dumps(result))
""")


@pytest.fixture(scope="module", autouse=True)
def jax_run(saved_tiny):
    """JAX_SCRIPT on the saved models, started with the module: its imports and compiles overlap the other tests."""
    paths = {name: str(path) for name, (path, _, _) in saved_tiny.items()}
    proc = subprocess.Popen([sys.executable, "-c", JAX_SCRIPT, json.dumps(paths)], env=jax_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_models_load_and_run_under_jax(saved_tiny, jax_run):
    """Built and saved under TensorFlow; loaded with a plain load_model under JAX: same outputs."""
    stdout, stderr = jax_run.communicate(timeout=300)
    assert jax_run.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    for name, (_, _, expected) in saved_tiny.items():
        np.testing.assert_allclose(np.asarray(result["outputs"][name]), expected, atol=1e-5)
    assert result["flops"] == forward_flops(build_generator(32, TINY))
    max_abs_ab, logits_shape = result["training"]
    assert max_abs_ab <= 1 and logits_shape == [2, 2, 2, 1]

