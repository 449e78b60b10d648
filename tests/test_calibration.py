from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from qtoolkit import plugins
from qtoolkit.calibration import (CalibrationSet, chain_assignment, chain_generator, chain_timesteps,
                                  fractions_to_chain_positions, generate_calibration_set, plot_timestep_histogram)
from qtoolkit.errors import QtoolkitError
from qtoolkit_plugins.ndtc import NDTC_PRESETS, SkewNormal, draw_ndtc_fractions, sample_skew_normal
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel
from qtoolkit.sampling import denoise, initial_noise, make_scheduler, unet_predictor


class CheapUnet(torch.nn.Module):
    """A deterministic stand-in noise predictor that depends on x and t, and counts its calls."""

    def __init__(self, fail_if_called: bool = False):
        super().__init__()
        self.config = SimpleNamespace(in_channels=1, sample_size=4)
        self.fail_if_called = fail_if_called
        self.samples_seen = 0

    def forward(self, x, t):
        assert not self.fail_if_called, "the network ran although the arguments were bad"
        self.samples_seen += x.shape[0]
        return SimpleNamespace(sample=0.1 * x + 1e-4 * t.view(-1, 1, 1, 1).float())


def cheap_model(**kwargs) -> DiffusionModel:
    return DiffusionModel(unet=CheapUnet(**kwargs), scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), path="cheap")


# --- timestep distributions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [-5.0, 0.0, 2.0, 8.0])
def test_skew_normal_draws_have_the_analytic_moments(shape):
    dist = SkewNormal(shape=shape, loc=0.3, scale=0.2)
    draws = sample_skew_normal(100_000, dist, np.random.default_rng(0))
    mean, var, skew = stats.skewnorm.stats(shape, loc=0.3, scale=0.2, moments="mvs")
    assert abs(draws.mean() - mean) < 5 * np.sqrt(var / len(draws))
    assert draws.var() == pytest.approx(var, rel=0.02)
    assert stats.skew(draws) == pytest.approx(skew, abs=0.05)


def test_out_of_range_draws_are_clamped_or_redrawn():
    dist = SkewNormal(shape=0.0, loc=0.5, scale=0.5)
    clamped = draw_ndtc_fractions(20_000, dist, np.random.default_rng(0), "clamp")
    redrawn = draw_ndtc_fractions(20_000, dist, np.random.default_rng(0), "resample")
    outside_below = stats.norm.cdf(0, 0.5, 0.5)  # 15.9% of N(0.5, 0.5) lies below 0, as much above 1
    assert np.mean(clamped == 0.0) == pytest.approx(outside_below, abs=0.01)
    assert np.mean(clamped == 1.0) == pytest.approx(outside_below, abs=0.01)
    assert redrawn.min() > 0 and redrawn.max() < 1
    assert np.histogram(redrawn, bins=4, range=(0, 1))[0].min() > 0.2 * len(redrawn)  # truncated normal: flat-ish


def test_presets_are_the_documented_ones():
    assert NDTC_PRESETS["paper"] == SkewNormal(shape=0.0, loc=0.5, scale=0.5)
    assert NDTC_PRESETS["reference-code"] == SkewNormal(shape=0.0, loc=0.4, scale=0.4)


def test_fractions_go_to_the_nearest_chain_timestep_counted_from_data():
    chain = np.arange(990, -1, -10)  # DDIM-100 on T = 1000
    positions = fractions_to_chain_positions(np.array([0.0, 0.504, 0.506, 0.5, 1.0]), chain, 1000)
    assert chain[positions].tolist() == [0, 500, 510, 500, 990]


def _expected_step_probabilities(dist: SkewNormal, chain: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """P(chain step k) when u is clamped to [0, 1] and mapped to the nearest timestep: integrate between midpoints."""
    midpoints = (chain[:-1] + chain[1:]) / 2 / num_train_timesteps
    upper = np.concatenate([[np.inf], midpoints])  # chain descends: step 0 collects everything noisier
    lower = np.concatenate([midpoints, [-np.inf]])  # the last step collects everything cleaner
    cdf = lambda u: stats.skewnorm.cdf(u, dist.shape, dist.loc, dist.scale)  # noqa: E731
    return cdf(upper) - cdf(lower)


def test_ndtc_timesteps_follow_the_requested_skew_normal():
    num, steps = 3000, 20
    dist = SkewNormal(shape=2.0, loc=0.35, scale=0.35)  # skewed, so a flipped axis would show
    model = cheap_model()
    calib = generate_calibration_set("ndtc", model, num, steps=steps, batch_size=num, progress=False,
                                     shape=dist.shape, loc=dist.loc, scale=dist.scale)
    chain = chain_timesteps(model, "ddim", steps)
    counts = np.array([(calib.t == step).sum().item() for step in chain])
    assert counts.sum() == num  # every t is a chain timestep
    expected = _expected_step_probabilities(dist, chain, 1000) * num
    assert expected.min() >= 5
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    mirrored = expected[::-1]
    assert stats.chisquare(counts, mirrored * num / mirrored.sum()).pvalue < 1e-6


# --- every strategy ---------------------------------------------------------------------------------------------

BUILT_IN_STRATEGIES = ["ndtc", "uniform", "first-n", "random", "real-data"]


def test_the_built_in_strategies_are_registered_plugins():
    assert set(BUILT_IN_STRATEGIES) <= set(plugins.names("register_calibration_strategies"))


@pytest.mark.parametrize("strategy", BUILT_IN_STRATEGIES)
def test_each_strategy_yields_num_pairs_on_its_timesteps(tiny_model, strategy):
    num, steps, batch_size = 7, 6, 3
    extra = {"real_images": torch.rand(5, 1, 8, 8) * 2 - 1} if strategy == "real-data" else {}
    calib = generate_calibration_set(strategy, tiny_model, num, steps=steps, batch_size=batch_size, progress=False,
                                     **extra)
    assert calib.x.shape == (num, 1, 8, 8) and calib.x.dtype == torch.float32
    assert calib.t.shape == (num,) and calib.t.dtype == torch.int64 and calib.cond is None
    assert sum(calib.meta["timestep_histogram"].values()) == num and calib.meta["strategy"] == strategy
    cost = calib.meta["cost"]
    assert cost["sample_evaluations"] <= num * steps and cost["batched_calls"] <= -(-num // batch_size) * steps
    chain = chain_timesteps(tiny_model, "ddim", steps)
    if strategy == "real-data":
        assert ((calib.t >= 0) & (calib.t < 1000)).all() and cost["sample_evaluations"] == 0
    else:
        assert set(calib.t.tolist()) <= set(chain.tolist())
    if strategy == "first-n":  # n = 1: pure noise at the chain's first timestep, the naive baseline; no network call
        assert (calib.t == chain[0]).all() and cost == {"sample_evaluations": 0, "batched_calls": 0}
        torch.testing.assert_close(calib.x, initial_noise(num, (1, 8, 8), seed=0), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_first_n_takes_the_chains_first_n_steps_evenly(tiny_model, n):
    num, steps = 13, 6
    calib = generate_calibration_set("first-n", tiny_model, num, steps=steps, batch_size=4, progress=False, n=n)
    chain = chain_timesteps(tiny_model, "ddim", steps).tolist()
    counts = [(calib.t == chain[i]).sum().item() for i in range(steps)]
    assert all(c > 0 for c in counts[:n]) and not any(counts[n:]) and max(counts[:n]) - min(counts[:n]) <= 1
    assert calib.meta["parameters"] == {"n": n}


@pytest.mark.parametrize("num, num_steps", [(23, None), (23, 5), (20, 20)])
def test_uniform_spreads_samples_evenly_over_evenly_spaced_steps(num, num_steps):
    steps = 20
    model = cheap_model()
    params = {} if num_steps is None else {"num_steps": num_steps}
    calib = generate_calibration_set("uniform", model, num, steps=steps, batch_size=8, progress=False, **params)
    chain = chain_timesteps(model, "ddim", steps).tolist()
    chosen = sorted({chain.index(t) for t in calib.t.tolist()})
    assert len(chosen) == (num_steps or min(num, steps))
    assert chosen[0] == 0 and chosen[-1] == steps - 1
    assert np.ptp(np.diff(chosen)) <= 1  # evenly spaced up to rounding
    counts = [(calib.t == chain[i]).sum().item() for i in chosen]
    assert sum(counts) == num and max(counts) - min(counts) <= 1
    assert calib.t.tolist() != sorted(calib.t.tolist(), reverse=True)  # shuffled, not grouped by step


def test_real_data_noises_real_images_with_q_xt_given_x0_at_uniform_t():
    num = 4000
    image = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    model = cheap_model()
    calib = generate_calibration_set("real-data", model, num, real_images=image, progress=False)
    assert stats.chisquare(np.histogram(calib.t.numpy(), bins=10, range=(0, 1000))[0]).pvalue > 1e-3
    abar = make_scheduler("ddpm", model.scheduler_config, 1000).alphas_cumprod[calib.t].view(-1, 1, 1, 1)
    noise = (calib.x - abar.sqrt() * image) / (1 - abar).sqrt()
    assert abs(noise.mean().item()) < 0.02 and noise.std().item() == pytest.approx(1.0, abs=0.02)
    assert model.unet.samples_seen == 0


# --- pairing: each x_t is what the denoising loop fed the network with that t -----------------------------------

def record_chain(model, scheduler, steps, x_T, generator):
    """Every network input of a full chain, by chain position."""
    inputs, timesteps = [], []
    denoise(unet_predictor(model.unet), make_scheduler(scheduler, model.scheduler_config, steps), x_T,
            generator=generator, on_step=lambda i, t, x: (inputs.append(x.clone()), timesteps.append(t)))
    return inputs, timesteps


def documented_chains(positions, inputs_per_chain):
    """The chains of qtoolkit.calibration.chains' contract: the samples of each chain, and the sample whose noise
    starts it. Written from the docstring, not from the code, so that the two can disagree."""
    num = len(positions)
    order = np.argsort(positions, kind="stable")
    num_chains = max(-(-num // inputs_per_chain), np.bincount(positions).max())
    return [order[c::num_chains] for c in range(num_chains)], order[:num_chains]


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
@pytest.mark.parametrize("strategy, inputs_per_chain", [("ndtc", 1), ("uniform", 1), ("random", 1), ("ndtc", 3),
                                                        ("uniform", 4)])
def test_each_stored_x_t_is_the_network_input_at_its_timestep(tiny_model, strategy, scheduler, inputs_per_chain):
    num, steps, batch_size, seed = 9, 8, 4, 3
    calib = generate_calibration_set(strategy, tiny_model, num, scheduler=scheduler, steps=steps, seed=seed,
                                     batch_size=batch_size, inputs_per_chain=inputs_per_chain, progress=False)
    assert calib.meta["inputs_per_chain"] == inputs_per_chain
    chain = chain_timesteps(tiny_model, scheduler, steps).tolist()
    positions = np.array([chain.index(t) for t in calib.t.tolist()])
    x_T = initial_noise(num, tiny_model.sample_shape, seed)
    # Re-run the chains as documented in qtoolkit.calibration.chains, batch by batch.
    members, starts = documented_chains(positions, inputs_per_chain)
    assert max(len(m) for m in members) <= inputs_per_chain
    for b, first in enumerate(range(0, len(starts), batch_size)):
        chains = range(first, min(first + batch_size, len(starts)))
        inputs, timesteps = record_chain(tiny_model, scheduler, steps, x_T[starts[list(chains)]],
                                         chain_generator(seed, b))
        assert timesteps == chain
        for k, c in enumerate(chains):
            assert len(set(positions[members[c]])) == len(members[c])  # no chain holds one position twice
            for row in members[c]:
                torch.testing.assert_close(calib.x[row], inputs[positions[row]][k], rtol=0, atol=0)
    if scheduler == "ddim" and inputs_per_chain == 1:  # deterministic chains: one batch of all samples agrees too
        inputs, _ = record_chain(tiny_model, scheduler, steps, x_T, None)
        expected = torch.stack([inputs[p][row] for row, p in enumerate(positions)])
        # Batch sizes round differently (clipped x_0 included); a wrong pairing would be O(1) off.
        torch.testing.assert_close(calib.x, expected, rtol=1e-4, atol=1e-4)


def test_several_inputs_per_chain_keep_the_timesteps_and_cut_the_cost():
    num, steps = 64, 20
    make = lambda k: generate_calibration_set("ndtc", cheap_model(), num, steps=steps, batch_size=num,  # noqa: E731
                                              inputs_per_chain=k, progress=False)
    one, four = make(1), make(4)
    assert one.t.tolist() == four.t.tolist()  # the same positions, for the same samples
    positions = np.array([chain_timesteps(cheap_model(), "ddim", steps).tolist().index(t) for t in four.t.tolist()])
    num_chains = len(chain_assignment(positions, 4)[1])
    assert num_chains == num // 4  # the clamped ends hold fewer than num / 4 inputs each
    # One batch of chains runs up to its latest wanted position: num chains for K = 1, num / 4 for K = 4.
    assert one.meta["cost"]["sample_evaluations"] == num * positions.max()
    assert four.meta["cost"]["sample_evaluations"] == num_chains * positions.max()
    assert len(torch.unique(four.x, dim=0)) == num  # every input is its own tensor, not a copy of another


def test_a_position_wanted_more_often_than_there_are_chains_gets_more_chains():
    positions = np.array([0] * 6 + [3, 4])
    chain_of, starts = chain_assignment(positions, inputs_per_chain=4)
    assert len(starts) == 6  # six inputs at position 0 need six chains, not ceil(8 / 4) = 2
    for c in range(len(starts)):
        assert len(set(positions[chain_of == c])) == (chain_of == c).sum()


def test_chains_stop_once_their_samples_are_kept_and_cost_is_counted():
    num, steps, batch_size = 40, 10, 8
    model = cheap_model()
    calib = generate_calibration_set("ndtc", model, num, steps=steps, batch_size=batch_size, progress=False)
    positions = np.sort([chain_timesteps(model, "ddim", steps).tolist().index(t) for t in calib.t.tolist()])
    # Batch b (grouped by position) runs up to, not including, the network call at its last wanted position.
    expected = sum(len(batch) * batch.max() for batch in np.split(positions, range(batch_size, num, batch_size)))
    assert calib.meta["cost"]["sample_evaluations"] == model.unet.samples_seen == expected
    assert expected < num * steps


# --- determinism, storage, reports, errors ----------------------------------------------------------------------

def test_generation_is_deterministic_for_a_seed(tiny_model):
    make = lambda seed: generate_calibration_set("ndtc", tiny_model, 6, steps=5, seed=seed, batch_size=4,  # noqa: E731
                                                 progress=False)
    a, b, c = make(1), make(1), make(2)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.t.tolist() == b.t.tolist() and a.meta == b.meta
    assert not torch.equal(a.x, c.x)


def test_save_load_round_trip(tmp_path, tiny_model):
    calib = generate_calibration_set("random", tiny_model, 5, steps=4, batch_size=5, progress=False)
    calib.cond = torch.arange(5)
    calib.save(tmp_path / "calib")
    loaded = CalibrationSet.load(tmp_path / "calib")
    torch.testing.assert_close(loaded.x, calib.x, rtol=0, atol=0)
    assert torch.equal(loaded.t, calib.t) and torch.equal(loaded.cond, calib.cond) and loaded.meta == calib.meta
    with pytest.raises(QtoolkitError, match="already exists"):
        calib.save(tmp_path / "calib")
    calib.save(tmp_path / "calib", overwrite=True)


def test_corrupt_or_incomplete_sets_are_clear_errors(tmp_path):
    CalibrationSet(x=torch.zeros(2, 1, 4, 4), t=torch.zeros(2, dtype=torch.long)).save(tmp_path / "c")
    tensors, meta = tmp_path / "c" / "calibration.safetensors", tmp_path / "c" / "meta.json"
    meta.write_text("{not json")
    with pytest.raises(QtoolkitError, match="meta.json is corrupt"):
        CalibrationSet.load(tmp_path / "c")
    meta.write_text("{}")
    tensors.write_bytes(tensors.read_bytes()[:-10])
    with pytest.raises(QtoolkitError, match="corrupt or truncated"):
        CalibrationSet.load(tmp_path / "c")
    tensors.unlink()
    with pytest.raises(QtoolkitError, match="calibration.safetensors is missing"):
        CalibrationSet.load(tmp_path / "c")


def test_histogram_plot_is_written(tmp_path, tiny_model):
    sets = {name: generate_calibration_set(name, tiny_model, 4, steps=3, progress=False) for name in ("ndtc", "first-n")}
    plot_timestep_histogram(sets, tmp_path / "hist.png")
    assert (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("strategy, num, kwargs, message", [
    ("ndtc2", 4, {}, "unknown calibration strategy 'ndtc2': choose one of: .*first-n.*ndtc"),
    ("ndtc", 0, {}, "num must be an integer >= 1"),
    ("ndtc", -3, {}, "num must be an integer >= 1"),
    ("ndtc", 4, {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ("ndtc", 4, {"inputs_per_chain": 0}, "inputs_per_chain must be an integer >= 1"),
    ("ndtc", 4, {"scale": 0.0}, "scale must be > 0"),
    ("ndtc", 4, {"scale": -0.1}, "scale must be > 0"),
    ("ndtc", 4, {"loc": "middle"}, "loc must be a finite number"),
    ("ndtc", 4, {"preset": "cvpr"}, "unknown NDTC preset"),
    ("ndtc", 4, {"out_of_range": "wrap"}, "unknown out_of_range"),
    ("ndtc", 4, {"loc": 40.0, "scale": 0.1, "out_of_range": "resample"}, "almost no mass in"),
    ("ndtc", 4, {"mu": 0.5}, "takes no parameter 'mu'"),
    ("ndtc", 4, {"real_images": torch.zeros(1, 1, 4, 4)}, "takes no parameter 'real_images'"),
    ("ndtc", 4, {"scheduler": "euler"}, "unknown scheduler"),
    ("uniform", 4, {"num_steps": 5}, "num_steps must be an integer between 1 and"),
    ("first-n", 4, {"n": 6}, "n must be an integer between 1 and the chain's steps"),
    ("first-n", 4, {"n": 0}, "n must be an integer between 1 and the chain's steps"),
    ("real-data", 4, {"data_root": "/nonexistent/fashion-mnist"}, "Fashion-MNIST folder /nonexistent/fashion-mnist does not exist"),
    ("real-data", 4, {"real_images": torch.zeros(3, 1, 8, 8)}, r"shape \(N, 1, 4, 4\)"),
    ("real-data", 4, {"real_images": torch.full((3, 1, 4, 4), 255.0)}, r"range \[-1, 1\]"),
    ("real-data", 4, {"real_images": torch.zeros(3, 1, 4, 4, dtype=torch.uint8)}, "must be a float tensor"),
])
def test_bad_arguments_fail_clearly_before_any_network_call(strategy, num, kwargs, message):
    with pytest.raises(QtoolkitError, match=message):
        generate_calibration_set(strategy, cheap_model(fail_if_called=True), num, steps=5, progress=False, **kwargs)
