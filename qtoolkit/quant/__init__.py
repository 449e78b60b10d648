"""The numbers of quantization: what to quantize (QuantConfig), the uniform affine grid (QuantParams), the
observers that choose its range, and the FakeQuantize module that the graph pass (qtoolkit.graph) inserts.

Layer: numeric primitives (observers, quantizer parameters, fake-quantize, QuantConfig, overflow_fix), no graph.
May import the foundation only (errors, plugins, registry, progress).
"""

from .config import FLOAT_RULES, QuantConfig
from .fake_quant import FakeQuantize
from .observers import (HistogramLpObserver, MinMaxObserver, Observer, PercentileObserver, WeightLpObserver,
                        make_activation_observer, make_weight_observer)
from .quantizer import QuantParams, integer_range

__all__ = ["QuantConfig", "FLOAT_RULES", "QuantParams", "integer_range", "FakeQuantize", "Observer", "MinMaxObserver",
           "PercentileObserver", "HistogramLpObserver", "WeightLpObserver", "make_activation_observer",
           "make_weight_observer"]
