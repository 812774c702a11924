"""A trained colorizer, made cheaper to run: the same function, computed with faster operations.

The U-Net's decoder upsamples with `Conv2DTranspose(kernel 4, strides 2, padding "same")`. On the CPU,
TensorFlow runs it as a convolution's input gradient, which rearranges the whole kernel on every call: at
batch 1 the 8 M-weight layers near the bottleneck (2×2 and 4×4 pixels) cost more than their arithmetic, and
the decoder took most of the U-Net's time per photo (README, "Measured figures behind the code"). The same
layer is four 2×2
convolutions, one per output phase (even/odd row × even/odd column), whose kernels are slices of the
transposed kernel, made once here rather than on every call: each output pixel is the same sum of the same
products. Used where a loaded model only predicts (`colorize`, `serve`, the registered model); training
keeps Keras's layer.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

# Output row 2m takes input rows m-1 and m through kernel rows 3 and 1; row 2m+1 takes m and m+1 through
# 2 and 0 (and so for columns). From the transposed conv's definition with "same" padding (1 before).
PHASE_TAPS = ((3, 1), (2, 0))


def _is_upsampling_conv(layer) -> bool:
    """A stride-2, 4×4 "same" Conv2DTranspose reading at most 4 pixels per output channel: where the phase
    convolutions were measured faster; on larger maps TensorFlow's own way is efficient and converting the
    kernel would not pay (README, "Measured figures behind the code")."""
    if type(layer) is not keras.layers.Conv2DTranspose:
        return False
    try:
        height, width = layer.input.shape[1:3]
    except (AttributeError, ValueError):  # a layer called more than once has no single input
        return False
    return (height is not None and width is not None and height * width <= 4 * layer.filters
            and tuple(layer.kernel_size) == (4, 4)
            and tuple(layer.strides) == (2, 2) and layer.padding == "same"
            and tuple(layer.dilation_rate) == (1, 1) and layer.data_format == "channels_last"
            and layer.output_padding is None)


class PhaseConvTranspose(keras.layers.Layer):
    """`Conv2DTranspose(filters, 4, strides=2, padding="same")` as four 2×2 convolutions, made from one
    (`from_layer`); its weights are the phases' kernels [2 (row phase), 2 (column phase), 2, 2, in, out]
    and the bias."""

    def __init__(self, phase_kernels: np.ndarray, bias: np.ndarray | None, activation=None, **kwargs):
        super().__init__(**kwargs)
        self._initial = phase_kernels, bias  # the variables are made from them (no zeros first)
        self.filters = phase_kernels.shape[-1]
        self.activation = keras.activations.get(activation)

    @classmethod
    def from_layer(cls, layer: keras.layers.Conv2DTranspose) -> PhaseConvTranspose:
        kernel = ops.convert_to_numpy(layer.kernel).swapaxes(2, 3)  # [4, 4, in, out], as a convolution's
        rows = np.array(PHASE_TAPS)[:, None, :, None]  # [row phase, ·, tap row, ·]
        columns = np.array(PHASE_TAPS)[None, :, None, :]
        phases = kernel[rows, columns]  # [2, 2, 2, 2, in, out], gathered and transposed in one copy
        bias = ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        fast = cls(phases, bias, layer.activation, name=layer.name, dtype=layer.dtype_policy)
        fast.build(layer.input.shape)
        return fast

    def build(self, input_shape):
        phase_kernels, bias = self._initial
        self.phase_kernels = self.add_weight(name="phase_kernels", shape=phase_kernels.shape,
                                             initializer=lambda shape, dtype: phase_kernels, trainable=False)
        self.bias = None if bias is None else self.add_weight(
            name="bias", shape=bias.shape, initializer=lambda shape, dtype: bias, trainable=False)
        self._initial = None

    def call(self, x):
        rows = []
        for r in range(2):
            # phase r reads input rows (m-1, m) or (m, m+1): pad one row above or below, then a "valid"
            # 2-row convolution gives one output per input row
            columns = [ops.conv(ops.pad(x, [[0, 0], [1 - r, r], [1 - s, s], [0, 0]]), self.phase_kernels[r, s])
                       for s in range(2)]
            rows.append(ops.stack(columns, axis=3))  # [B, H, W, 2 (column phase), C]
        y = ops.stack(rows, axis=2)  # [B, H, 2 (row phase), W, 2, C]: interleaved when flattened
        shape = ops.shape(x)
        y = ops.reshape(y, (-1, 2 * shape[1], 2 * shape[2], self.filters))
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        return (batch, height and 2 * height, width and 2 * width, self.filters)


def for_inference(model: keras.Model) -> keras.Model:
    """`model` with every stride-2, 4×4 "same" Conv2DTranspose computed as four 2×2 convolutions (the
    others share `model`'s layers and weights). A model without one, or not functional, comes back as is."""
    if not isinstance(model, keras.Model) or not any(map(_is_upsampling_conv, model.layers)):
        return model
    try:
        return keras.models.clone_model(
            model, clone_function=lambda layer: PhaseConvTranspose.from_layer(layer) if _is_upsampling_conv(layer) else layer)
    except ValueError:  # a subclassed model: clone_model cannot rebuild its graph
        return model
