"""Post-training fake quantization of diffusion models, in three verbs (in the spirit of optimum-quanto):

    model = quantize(model, QuantConfig())        # swap Conv2d / Linear (and optionally attention matmuls)
    with calibrate(model):                        # forward passes feed the observers
        for x, t in calibration_batches:
            model(x, t)
    freeze(model)                                 # fix scales and zero points; the model now runs quantized
    # optional: a rounding method (a plugin, e.g. BRECQ / AdaRound) learns the weights' rounding
    correct_bias(model, fp_model, (x, t))         # optional: biases absorb the quantized outputs' mean error
    save_quantized(model, "out/")                 # safetensors + JSON; load_quantized("out/") rebuilds it
"""

from .api import calibrate, freeze, quant_units, quantize
from .attention import QuantAttnProcessor
from .bias_correction import correct_bias
from .config import DEFAULT_EXCLUDE, QuantConfig
from .fake_quant import FakeQuantize
from .layers import QuantConv2d, QuantLinear
from .observers import (HistogramLpObserver, MinMaxObserver, Observer, PercentileObserver, WeightLpObserver,
                        make_activation_observer, make_weight_observer)
from .quantizer import QuantParams, integer_range
from .serialization import frozen_params, load_quantized, read_quantized_metadata, save_quantized

__all__ = [
    "quantize", "calibrate", "freeze", "correct_bias", "save_quantized", "load_quantized", "read_quantized_metadata",
    "QuantConfig", "DEFAULT_EXCLUDE", "QuantParams", "integer_range", "FakeQuantize", "QuantConv2d", "QuantLinear",
    "QuantAttnProcessor", "quant_units", "frozen_params", "Observer", "MinMaxObserver", "PercentileObserver",
    "HistogramLpObserver", "WeightLpObserver", "make_activation_observer", "make_weight_observer",
]
