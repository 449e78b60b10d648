import pytest
import torch

from qtoolkit import hookimpl, plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import calibrate, capture, freeze, quant_ops, quantize
from qtoolkit.plugins import PluginInfo
from qtoolkit.quant import (HistogramLpObserver, MinMaxObserver, PercentileObserver, QuantConfig, WeightLpObserver,
                            make_activation_observer, make_weight_observer)
from qtoolkit.registry import Observer


def _batches():
    """Batches whose ranges differ by orders of magnitude and sign, so the histogram must re-bin several times."""
    torch.manual_seed(0)
    return [torch.randn(300) * 0.01, torch.randn(200) + 3, torch.randn(250) * 40 - 7, torch.rand(100) * 0.5]


def _same_params(a, b):
    return torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("make", [lambda: MinMaxObserver(axis=None), lambda: PercentileObserver(99.0),
                                  lambda: HistogramLpObserver(2.4), lambda: WeightLpObserver(axis=None)])
def test_merging_observers_equals_observing_the_concatenation(make):
    batches = _batches()
    whole = make()
    whole.observe(torch.cat(batches))
    first, second = make(), make()
    for batch in batches[::2]:
        first.observe(batch)
    for batch in batches[1::2]:
        second.observe(batch)
    merged = first.merge(second)
    for bits, symmetric in [(8, False), (4, True)]:
        assert _same_params(merged.compute_params(bits, symmetric), whole.compute_params(bits, symmetric))


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_streaming_histogram_is_exact_whatever_the_batch_order(order):
    batches = _batches()
    whole = HistogramLpObserver()
    whole.observe(torch.cat(batches))
    streamed = HistogramLpObserver()
    for i in order:
        streamed.observe(batches[i])
    assert (streamed.exponent, streamed.start) == (whole.exponent, whole.start)
    assert torch.equal(streamed.counts, whole.counts)
    assert streamed.counts.sum() == sum(b.numel() for b in batches)


def test_per_channel_min_max_merges_across_batches():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3, 5), torch.randn(6, 3, 5) * 4
    streamed, merged, other = MinMaxObserver(axis=1), MinMaxObserver(axis=1), MinMaxObserver(axis=1)
    streamed.observe(a)
    streamed.observe(b)
    merged.observe(a)
    other.observe(b)
    merged.merge(other)
    both = torch.cat([a, b])
    assert torch.equal(streamed.max_val, both.amax(dim=(0, 2)))
    assert _same_params(streamed.compute_params(8, False), merged.compute_params(8, False))
    assert streamed.compute_params(8, False).scale.shape == (3,)


def _gaussian_with_outlier():
    torch.manual_seed(0)
    data = torch.randn(20000)
    data[123] = 60.0
    return data


@pytest.mark.parametrize("clipping", [lambda: HistogramLpObserver(2.4), lambda: PercentileObserver(99.9)])
def test_clipping_observers_ignore_an_outlier_and_lower_the_error(clipping):
    data = _gaussian_with_outlier()
    minmax, clipped = MinMaxObserver(), clipping()
    for chunk in data.split(5000):  # streamed in calibration-sized batches
        minmax.observe(chunk)
        clipped.observe(chunk)
    full, clip = minmax.compute_params(4, False), clipped.compute_params(4, False)
    assert clip.scale < full.scale / 2
    assert (clip.fake_quantize(data) - data).pow(2).mean() < (full.fake_quantize(data) - data).pow(2).mean()


def test_lp_search_on_weights_is_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(3, 256, 3, 3) * torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    weight[2, 0, 0, 0] = 80.0  # an 8-sigma outlier in channel 2 only
    observer, minmax = WeightLpObserver(axis=0), MinMaxObserver(axis=0)
    observer.observe(weight)
    minmax.observe(weight)
    lp, full = observer.compute_params(4, True), minmax.compute_params(4, True)
    assert lp.scale.shape == (3,)
    assert lp.scale[2] < full.scale[2] / 2  # the outlier's channel is clipped hard
    assert torch.allclose(lp.scale[:2] / full.scale[:2], lp.scale[1] / full.scale[1], rtol=0.2)  # the others alike
    lp_error = (lp.fake_quantize(weight) - weight).abs().pow(2.4).flatten(1).sum(1)
    full_error = (full.fake_quantize(weight) - weight).abs().pow(2.4).flatten(1).sum(1)
    assert (lp_error <= full_error * (1 + 1e-6)).all()


def test_constant_and_empty_inputs():
    observer = HistogramLpObserver()
    observer.observe(torch.zeros(10))
    observer.observe(torch.zeros(0))
    params = observer.compute_params(8, False)
    assert params.scale > 0 and params.fake_quantize(torch.zeros(1)).item() == 0.0


def test_observer_errors_are_clear():
    with pytest.raises(QtoolkitError, match="observed nothing"):
        HistogramLpObserver().compute_params(8, False)
    with pytest.raises(QtoolkitError, match="NaN or inf"):
        PercentileObserver().observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(QtoolkitError, match="cannot merge"):
        MinMaxObserver(axis=None).merge(MinMaxObserver(axis=0))
    with pytest.raises(QtoolkitError, match="cannot merge"):
        PercentileObserver().merge(HistogramLpObserver())


# The names a QuantConfig chooses observers by: plugin records (hook register_observers).

@pytest.fixture
def plugin_state():
    """The installed plugins, to which a test may add its own; forgotten afterwards."""
    plugins.reload()
    yield
    plugins.reload()


def _add(plugin_name, *records):
    class Plugin:
        @hookimpl
        def register_observers(self, register):
            for record in records:
                register(record)

    plugins.add_plugin(Plugin(), PluginInfo(plugin_name, "1.0", f"dist-{plugin_name}", f"tests.{plugin_name}"))


def test_the_builtin_names_make_the_observers_they_describe(plugin_state):
    config = QuantConfig(mse_p=2.0, percentile=99.5)
    assert (config.weight_observer, config.activation_observer) == ("mse", "mse")  # the defaults, filled in
    weight = make_weight_observer(config, 0)
    activation = make_activation_observer(config)
    assert type(weight) is WeightLpObserver and (weight.axis, weight.p) == (0, 2.0)
    assert type(activation) is HistogramLpObserver and activation.p == 2.0
    percentile = make_activation_observer(QuantConfig(activation_observer="percentile", percentile=99.5))
    assert type(percentile) is PercentileObserver and percentile.percentile == 99.5
    minmax = QuantConfig(weight_observer="minmax", activation_observer="minmax")
    assert type(make_weight_observer(minmax, None)) is MinMaxObserver and make_weight_observer(minmax, 0).axis == 0
    assert type(make_activation_observer(minmax)) is MinMaxObserver
    with pytest.raises(QtoolkitError, match="^weight_observer = 'percentile' observes activation tensors only"):
        QuantConfig(weight_observer="percentile")


class AbsMaxObserver(MinMaxObserver):
    """A third party's observer: the symmetric range of the largest magnitude seen."""

    def compute_params(self, bits, symmetric):
        magnitude = torch.maximum(self.min_val.abs(), self.max_val.abs())
        self.min_val, self.max_val = -magnitude, magnitude
        return super().compute_params(bits, symmetric)


def test_a_plugins_observer_is_what_the_quantized_graph_observes_with(plugin_state, tiny_model):
    _add("absmax", Observer(name="absmax", kind="activation", factory=lambda role, axis, config: AbsMaxObserver(axis)))
    config = QuantConfig(activation_observer="absmax")
    qgraph = quantize(capture(tiny_model.denoiser(), tiny_model.sample_shape), config)
    ops = list(quant_ops(qgraph).values())
    assert ops and all(type(op.input.observer) is AbsMaxObserver for op in ops)
    assert all(type(op.weight.observer) is WeightLpObserver for op in ops)  # weights keep the default
    with calibrate(qgraph):
        qgraph(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]))
    freeze(qgraph)
    # absmax's range is symmetric about 0: an asymmetric 8-bit grid puts zero in its middle
    assert all(op.input.zero_point.item() in (127, 128) for op in ops)


def test_default_observers_are_one_per_role(plugin_state, monkeypatch):
    minmax = lambda role, axis, config: MinMaxObserver(axis)  # noqa: E731
    _add("rival", Observer(name="rival", kind="both", factory=minmax, default_for=("weight",)))
    assert QuantConfig(weight_observer="mse").weight_observer == "mse"  # named: no default needed
    with pytest.raises(QtoolkitError, match=r"^weight_observer is not set and several observers are registered as "
                                            r"the default weight observer: 'mse' \(plugin 'range-observers'\), "
                                            r"'rival' \(plugin 'rival'\)"):
        QuantConfig()
    monkeypatch.setenv(plugins.LOAD_ENV, "")
    plugins.reload()
    _add("plain", Observer(name="plain", kind="activation", factory=minmax))
    with pytest.raises(QtoolkitError, match="^weight_observer is not set and no installed plugin registers a default "
                                            "weight observer: set weight_observer to one of: none installed$"):
        QuantConfig()


def test_bad_observer_records_and_factories_are_refused(plugin_state):
    minmax = lambda role, axis, config: MinMaxObserver(axis)  # noqa: E731
    with pytest.raises(ValueError, match="kind 'bias'"):
        Observer(name="x", kind="bias", factory=minmax)
    with pytest.raises(ValueError, match="default_for"):
        Observer(name="x", kind="activation", factory=minmax, default_for=("weight",))
    _add("odd", Observer(name="odd", kind="both", factory=lambda role, axis, config: "not an observer"))
    with pytest.raises(QtoolkitError, match="observer 'odd' made a str, not a qtoolkit.quant.observers.Observer"):
        make_weight_observer(QuantConfig(weight_observer="odd"), 0)
