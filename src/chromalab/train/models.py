"""The networks: the seed's baseline CNN and pix2pix (U-Net generator + 70×70 PatchGAN discriminator).

Pure Keras 3 built-in layers (no custom layers or objects), so every model builds and runs unchanged
under any backend and a saved `.keras` file loads with a plain `keras.saving.load_model(path)`.

Conventions (chromalab.color): input is normalised lightness L/100 in [0, 1], shape [B, S, S, 1];
output is normalised ab (a/128, b/128) in [-1, 1] through tanh, shape [B, S, S, 2].
`width` multiplies every hidden channel count (rounded, at least 1) so that tiny CPU runs are possible;
1.0 is the paper / the seed. Output layers run in float32 even under a mixed-precision policy (Keras'
mixed-precision advice: keep the model's outputs float32), so tanh outputs and logits are never rounded
to 16 bits.
"""

from __future__ import annotations

import functools
import math

import keras
from keras import layers

from chromalab.color import AB_SCALE
from chromalab.config import MODEL_NAMES, image_size_problem
from chromalab.errors import ChromalabError
from chromalab.train.diffaugment import DiffAugment

# pix2pix (Isola et al. 2017; the TensorFlow tutorial the seed copied)
GAN_BASE_CHANNELS = 64
GAN_MAX_CHANNELS = 512
GAN_KERNEL = 4
GAN_INIT_STDDEV = 0.02
LEAKY_SLOPE = 0.2  # pix2pix's; Keras 3's LeakyReLU defaults to 0.3
DROPOUT_RATE = 0.5
N_DROPOUT_UP_BLOCKS = 3
GENERATOR_NORMS = ("batch", "group")
GROUP_NORM_GROUPS = 32  # Wu & He 2018's default; fewer where the channels don't divide (gcd)
GROUP_NORM_MIN_SIZE = 2  # maps of this size or smaller get no GroupNorm (see _normalise)

# The seed's CNN: (filters, stride) of the encoder, then the decoder's three BN + Dropout convolutions
# and its two convolutions that are each followed by a 2× upsampling.
BASELINE_ENCODER = ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1))
BASELINE_DROPOUT_CONVS = (512, 256, 128)
BASELINE_UPSAMPLE_CONVS = (64, 32)
BASELINE_DOWNSAMPLING = 8  # three stride-2 convolutions
# The seed's stride-2 convolutions are 3×3 with padding="same". On an even-sized map that pads one pixel on
# the right/bottom only and samples at 2i+1, so each halving shifts the grid half a pixel right/down (3.5 px
# after three) and only the right/bottom border sees padding: the baseline's one-sided edge artefact.
# A 4×4 kernel at stride 2 pads one pixel on each side and samples at 2i+0.5, centred (pix2pix's choice).
BASELINE_DOWN_KERNEL = 4  # seed: 3
BASELINE_KERNEL = 3

L_CHANNELS = 1
AB_CHANNELS = 2


def scaled_channels(channels: int, width: float) -> int:
    """A hidden layer's channel count at this width: rounded, at least 1."""
    return max(1, round(channels * width))


def _check_width(width: float) -> None:
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ChromalabError(f"model width must be a positive number (1.0 = the paper), got {width!r}")


def _check_gan_size(image_size: int) -> None:
    problem = image_size_problem(image_size)
    if problem:
        raise ChromalabError(f"image size for pix2pix {problem}")


def unet_depth(image_size: int) -> int:
    """Number of U-Net down blocks: log2(size), so the bottleneck is 1×1 (8 at 256 px, 5 at 32 px)."""
    _check_gan_size(image_size)
    return image_size.bit_length() - 1


# --- baseline: the seed's CNN ------------------------------------------------------------------------


def build_baseline(image_size: int | None = 256, width: float = 1.0, dropout: float = DROPOUT_RATE) -> keras.Model:
    """The seed's CNN, layer for layer: 3×3 ReLU convolutions with BatchNorm, three stride-2 downsamplings,
    three BN + Dropout convolutions (rate `dropout`, the seed's 0.5), then three 2× nearest-neighbour
    upsamplings back to full size.
    One departure: the stride-2 convolutions are 4×4, not 3×3, so that they pad and sample symmetrically
    (BASELINE_DOWN_KERNEL: the seed's 3×3 painted a one-sided right/bottom edge).

    `image_size=None` gives a model for any size that is a multiple of 8.
    """
    _check_width(width)
    if image_size is not None and not (isinstance(image_size, int) and image_size >= BASELINE_DOWNSAMPLING
                                       and image_size % BASELINE_DOWNSAMPLING == 0):
        raise ChromalabError(f"image size for the baseline must be a multiple of {BASELINE_DOWNSAMPLING} "
                             f"(it downsamples 3 times by 2) or None, got {image_size!r}")
    inputs = keras.Input((image_size, image_size, L_CHANNELS), name="L")
    x = inputs
    n = 0

    def conv_bn(x, filters: int, strides: int = 1):
        nonlocal n
        n += 1
        kernel = BASELINE_DOWN_KERNEL if strides == 2 else BASELINE_KERNEL
        x = layers.Conv2D(scaled_channels(filters, width), kernel, strides=strides, padding="same",
                          activation="relu", name=f"conv{n}")(x)
        return layers.BatchNormalization(name=f"bn{n}")(x)

    for filters, strides in BASELINE_ENCODER:
        x = conv_bn(x, filters, strides)
    for filters in BASELINE_DROPOUT_CONVS:
        x = layers.Dropout(dropout, name=f"dropout{n + 1}")(conv_bn(x, filters))
    for filters in BASELINE_UPSAMPLE_CONVS:
        x = layers.UpSampling2D(2, name=f"upsample{n + 1}")(conv_bn(x, filters))
    x = layers.Conv2D(AB_CHANNELS, BASELINE_KERNEL, padding="same", activation="tanh", dtype="float32", name="ab_conv")(x)
    outputs = layers.UpSampling2D(2, dtype="float32", name="ab")(x)
    return keras.Model(inputs, outputs, name="baseline")


# --- pix2pix -----------------------------------------------------------------------------------------


def _init() -> keras.initializers.Initializer:
    # Unseeded: draws from Keras' global seed generator, so keras.utils.set_random_seed fixes it.
    return keras.initializers.RandomNormal(0.0, GAN_INIT_STDDEV)


def _normalise(x, norm: str | None, name: str):
    """BatchNorm (pix2pix: batch statistics in training, running averages in inference), GroupNorm (the same
    arithmetic in both, independent of the batch), or nothing.

    GroupNorm skips maps of 2×2 or smaller: over 4 or fewer positions per group the statistics are noise,
    and over one position (the 1×1 bottleneck) they erase the features.
    """
    if norm == "batch":
        return layers.BatchNormalization(name=f"{name}_bn")(x)
    if norm == "group" and x.shape[1] is not None and x.shape[1] > GROUP_NORM_MIN_SIZE:
        return layers.GroupNormalization(math.gcd(x.shape[-1], GROUP_NORM_GROUPS), name=f"{name}_gn")(x)
    return x


def _down(x, filters: int, name: str, norm: str | None = "batch"):
    """Conv 4×4 stride 2 (no bias) → [norm] → LeakyReLU(0.2): halves the size."""
    x = layers.Conv2D(filters, GAN_KERNEL, strides=2, padding="same", use_bias=False,
                      kernel_initializer=_init(), name=f"{name}_conv")(x)
    x = _normalise(x, norm, name)
    return layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"{name}_lrelu")(x)


def _up(x, filters: int, name: str, dropout: bool, norm: str = "batch"):
    """Transposed conv 4×4 stride 2 (no bias) → norm → [Dropout(0.5)] → ReLU: doubles the size."""
    x = layers.Conv2DTranspose(filters, GAN_KERNEL, strides=2, padding="same", use_bias=False,
                               kernel_initializer=_init(), name=f"{name}_convT")(x)
    x = _normalise(x, norm, name)
    if dropout:
        x = layers.Dropout(DROPOUT_RATE, name=f"{name}_dropout")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def unet_channels(image_size: int, width: float = 1.0) -> list[int]:
    """Channels of the U-Net's down blocks: 64, 128, 256, 512, 512, … (capped at 512), times width."""
    depth = unet_depth(image_size)
    return [scaled_channels(min(GAN_BASE_CHANNELS * 2**i, GAN_MAX_CHANNELS), width) for i in range(depth)]


def build_generator(image_size: int = 256, width: float = 1.0, norm: str = "batch") -> keras.Model:
    """pix2pix U-Net L → ab with log2(image_size) levels and skip connections (54.4 M params at 256 px
    for the paper's 3-in/3-out; ours is 1-in/2-out). `norm`: "batch" (pix2pix) or "group" (`_normalise`)."""
    _check_width(width)
    _check_norm(norm)
    down_channels = unet_channels(image_size, width)
    inputs = keras.Input((image_size, image_size, L_CHANNELS), name="L")
    x = inputs
    skips = []
    for i, filters in enumerate(down_channels, start=1):
        x = _down(x, filters, f"down{i}", norm=norm if i > 1 else None)
        skips.append(x)
    # Up blocks mirror the down blocks below the bottleneck; each output meets its mirror's skip.
    for i, (filters, skip) in enumerate(zip(reversed(down_channels[:-1]), reversed(skips[:-1])), start=1):
        x = _up(x, filters, f"up{i}", dropout=i <= N_DROPOUT_UP_BLOCKS, norm=norm)
        x = layers.Concatenate(name=f"up{i}_skip")([x, skip])
    outputs = layers.Conv2DTranspose(AB_CHANNELS, GAN_KERNEL, strides=2, padding="same", activation="tanh",
                                     kernel_initializer=_init(), dtype="float32", name="ab")(x)
    return keras.Model(inputs, outputs, name="generator")


def build_discriminator(image_size: int = 256, width: float = 1.0, *, spectral_norm: bool = False,
                        diffaug: bool = False) -> keras.Model:
    """pix2pix 70×70 PatchGAN: (L, ab) → one real/fake logit per overlapping 70×70 patch
    ([B, 30, 30, 1] at 256 px, [B, 2, 2, 1] at 32 px).

    For small data: `spectral_norm` bounds each convolution's spectral norm (Miyato et al. 2018) in place of
    BatchNorm; `diffaug` translates and cuts out what the discriminator sees, real and fake alike, in
    training only (Zhao et al. 2020, chromalab.train.diffaugment), so it cannot memorise the training pairs.
    """
    _check_width(width)
    _check_gan_size(image_size)
    L = keras.Input((image_size, image_size, L_CHANNELS), name="L")
    ab = keras.Input((image_size, image_size, AB_CHANNELS), name="ab")
    x = layers.Concatenate(name="L_ab")([L, ab])
    if diffaug:
        x = DiffAugment(name="diffaugment")(x)
    conv = _spectral(layers.Conv2D) if spectral_norm else layers.Conv2D
    norm = None if spectral_norm else "batch"
    for i, filters in enumerate((64, 128, 256), start=1):
        x = conv(scaled_channels(filters, width), GAN_KERNEL, strides=2, padding="same", use_bias=False,
                 kernel_initializer=_init(), name=f"down{i}_conv")(x)
        x = _normalise(x, norm if i > 1 else None, f"down{i}")
        x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"down{i}_lrelu")(x)
    x = layers.ZeroPadding2D(name="pad1")(x)
    x = conv(scaled_channels(512, width), GAN_KERNEL, strides=1, use_bias=False, kernel_initializer=_init(),
             name="conv4")(x)
    x = _normalise(x, norm, "conv4")
    x = layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name="conv4_lrelu")(x)
    x = layers.ZeroPadding2D(name="pad2")(x)
    logits = conv(1, GAN_KERNEL, strides=1, kernel_initializer=_init(), dtype="float32", name="logits")(x)
    return keras.Model([L, ab], logits, name="discriminator")


def _spectral(conv_class):
    """A convolution constructor whose layer comes wrapped in Keras' SpectralNormalization."""
    def build(*args, name: str, dtype=None, **kwargs):
        inner = conv_class(*args, name=name, dtype=dtype, **kwargs)
        return layers.SpectralNormalization(inner, name=f"{name}_sn", **({"dtype": dtype} if dtype else {}))
    return build


def _check_norm(norm: str) -> None:
    if norm not in GENERATOR_NORMS:
        raise ChromalabError(f"generator norm must be one of {', '.join(GENERATOR_NORMS)}, got {norm!r}")


def build_model(name: str, image_size: int | None = 256, width: float = 1.0) -> keras.Model:
    """The colorizer of a model name: "baseline" → the seed's CNN, "gan" → the pix2pix generator."""
    if name == "baseline":
        return build_baseline(image_size, width)
    if name == "gan":
        return build_generator(image_size, width)
    raise ChromalabError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")


def with_chroma_curve(colorizer: keras.Model, pivot: float, expand: float) -> keras.Model:
    """`colorizer` whose output chroma C (Lab units) becomes C (1 - k + k C / pivot) with k = `expand`, hue
    kept; k = 0 gives `colorizer` back. A net trained on a per-pixel loss paints the average of the colours
    a gray tone could be: near gray where it is unsure (clothes, backgrounds), vivid where it knows (skin).
    The curve widens that gap, grayer below `pivot` and more vivid above it (README, "The GAN recipe"), the
    same kind of knob as the annealed mean's temperature in Zhang et al. 2016. Built-in layers, so the
    saved model still loads with a plain load_model."""
    if expand == 0:
        return colorizer
    ab = colorizer.outputs[0]
    hue = layers.UnitNormalization(axis=-1, dtype="float32", name="chroma_hue")(ab)
    # C = <ab, ab / |ab|>: the norm without a square root, which no built-in layer takes.
    parts = layers.Multiply(dtype="float32", name="chroma_parts")([ab, hue])
    chroma = layers.Dense(1, use_bias=False, kernel_initializer="ones", trainable=False, dtype="float32",
                          name="chroma")(parts)
    gain = layers.Rescaling(scale=expand * AB_SCALE / pivot, offset=1.0 - expand, dtype="float32",
                            name="chroma_gain")(chroma)
    curved = layers.Multiply(dtype="float32", name="chroma_curve")([ab, gain])
    return keras.Model(colorizer.input, curved, name=colorizer.name)


# --- FLOPs -------------------------------------------------------------------------------------------

# Layers whose cost is not counted: per-element work (normalisation, activations, dropout, resizing,
# padding, concatenation, bias adds) is < 1% of the convolutions' at every size and width used here.
_UNCOUNTED = (layers.BatchNormalization, layers.GroupNormalization, layers.InputLayer, DiffAugment)


def forward_flops(model: keras.Model) -> int:
    """Forward FLOPs per image, 2 × the multiply-accumulates of every Conv2D, Conv2DTranspose and Dense.

    A Conv2D costs (output positions × kernel size), a Conv2DTranspose (input positions × kernel size):
    each input pixel scatters one kernel. Bias adds, BatchNorm and activations are not counted (< 1%).
    The model needs a fixed input size; a model holding other weighted layers is refused, not miscounted.
    """
    macs = 0
    for outer in _all_layers(model):
        # A SpectralNormalization wrapper costs its convolution (the power iteration is per weight, not per pixel).
        layer = outer.layer if isinstance(outer, layers.SpectralNormalization) else outer
        if isinstance(layer, layers.Conv2DTranspose):
            feature_map = outer.input.shape  # each input pixel scatters one kernel
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            feature_map = outer.output.shape
        elif layer.weights and not isinstance(layer, _UNCOUNTED):
            raise ChromalabError(f"forward_flops counts Conv2D, Conv2DTranspose and Dense only; layer "
                                 f"{layer.name!r} ({type(layer).__name__}) has weights it cannot count")
        else:
            continue
        macs += _positions(feature_map, layer) * math.prod(layer.kernel.shape)
    return 2 * macs


def _all_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def _positions(shape: tuple, layer) -> int:
    """Spatial positions per image of a feature map: its size without the batch and channel axes.

    The kernel's last axis is that map's channel count for all three layer types (Conv2D and Dense:
    outputs; Conv2DTranspose, whose kernel is [kh, kw, out, in]: inputs).
    """
    dims = shape[1:]
    if any(d is None for d in dims):
        raise ChromalabError(f"forward_flops needs a model of fixed input size; layer {layer.name!r} has "
                             f"shape {tuple(shape)} (build it with an image_size)")
    return math.prod(dims) // layer.kernel.shape[-1]


@functools.lru_cache(maxsize=None)
def gan_train_step_flops(image_size: int = 256, width: float = 1.0) -> int:
    """FLOPs per image of one pix2pix training step: 3·G + 7·D.

    Convention: a backward pass costs 2× its forward (gradients of activations and of weights). G runs
    forward and backward (3·G); D runs on the real pair (forward + backward for D's weights, 3·D) and on
    the fake pair (forward, backward for D's weights, and backward once more to the fake ab for G's
    adversarial gradient: 4·D). ≈ 80 GFLOP at 256 px (stack facts: 40 GMAC).
    """
    g = forward_flops(build_generator(image_size, width))
    d = forward_flops(build_discriminator(image_size, width))
    return 3 * g + 7 * d


@functools.lru_cache(maxsize=None)
def baseline_train_step_flops(image_size: int = 256, width: float = 1.0) -> int:
    """FLOPs per image of one baseline training step: forward + backward (2× forward) = 3× forward."""
    return 3 * forward_flops(build_baseline(image_size, width))
