"""The built-in loader of models quantized by qtoolkit: a run folder, its model/ folder, or a saved quantized network.

The reader is the graph layer's (`qtoolkit.graph.serialization.load_quantized_model`): a saved quantized model is
a captured graph, which the model plumbing below it does not know. This plugin says which sources it claims.
"""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.graph.serialization import load_quantized_model
from qtoolkit.models.loading import is_quantized_folder
from qtoolkit.registry import ModelLoader


@hookimpl
def register_model_loaders(register):
    register(ModelLoader(name="qtoolkit-quantized", claims=is_quantized_folder, load=load_quantized_model,
                         description="a local folder of a model quantized by qtoolkit (a run folder, its model/, "
                                     "or a saved quantized network)"))
