import pytest

from qtoolkit.errors import QtoolkitError
from qtoolkit.quant import FLOAT_RULES, QuantConfig


def test_json_round_trip_keeps_every_field():
    config = QuantConfig(weight_bits=4, activation_bits=None, weight_granularity="per_tensor", weight_symmetric=False,
                         activation_symmetric=True, weight_observer="minmax", activation_observer="percentile",
                         mse_p=2.0, percentile=99.9, include=["down_blocks.*"], exclude=["*conv_shortcut"])
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.from_json(QuantConfig().to_json()) == QuantConfig()


def test_defaults_follow_the_field():
    config = QuantConfig()
    assert (config.weight_bits, config.activation_bits) == (8, 8)
    assert config.weight_granularity == "per_channel" and config.weight_symmetric and not config.activation_symmetric
    assert (config.weight_observer, config.activation_observer, config.mse_p) == ("mse", "mse", 2.4)
    assert not config.quantize_attention_matmuls
    assert config.exclude == [] and config.include == ["*"] and config.keep_float == list(FLOAT_RULES)


def test_split_shortcuts_quantizes_the_shortcuts_the_default_keeps_in_float():
    """The default keeps every shortcut convolution in float; split_shortcuts exists to quantize them, per part
    (tests/test_graph.py checks which ops the rules match)."""
    split = QuantConfig(split_shortcuts=True)
    assert "shortcut" in QuantConfig().keep_float and "shortcut" not in split.keep_float
    assert QuantConfig.from_json(split.to_json()) == split


@pytest.mark.parametrize("changes, message", [
    ({"weight_bits": 0}, "weight_bits = 0"),
    ({"activation_bits": 33}, "activation_bits = 33"),
    ({"weight_observer": "kl"}, "weight_observer = 'kl'"),
    ({"weight_observer": "percentile"}, "weight_observer"),
    ({"activation_observer": "ema"}, "activation_observer = 'ema'"),
    ({"weight_granularity": "per_group"}, "weight_granularity"),
    ({"mse_p": 0}, "mse_p"),
    ({"percentile": 20}, "percentile"),
    ({"exclude": "conv_in"}, "exclude"),
    ({"keep_float": ["conv_in"]}, "keep_float = \\['conv_in'\\] must be a list of rules among timestep-path"),
    ({"activation_bits": None, "quantize_attention_matmuls": True}, "quantize_attention_matmuls"),
    ({"weight_bits": None, "quantize_conv_outputs": True}, "quantize_conv_outputs needs weight_bits"),
    ({"quantize_conv_outputs": 1}, "quantize_conv_outputs = 1"),
])
def test_invalid_configs_are_refused_with_the_field_named(changes, message):
    with pytest.raises(QtoolkitError, match=message.replace("(", r"\(")):
        QuantConfig(**changes)


def test_unknown_json_keys_and_bad_json_are_refused():
    with pytest.raises(QtoolkitError, match="unknown quantization config keys"):
        QuantConfig.from_json('{"weight_bit": 8}')
    with pytest.raises(QtoolkitError, match="not valid JSON"):
        QuantConfig.from_json("{weight_bits: 8")


