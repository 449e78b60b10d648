import pytest
import torch

from qtoolkit.errors import QtoolkitError
from qtoolkit.sampling import CPU_CALL_BATCH, denoise, in_cpu_calls, make_scheduler, sample, unet_predictor


def test_sampling_is_deterministic_for_a_seed(tiny_model):
    a = sample(tiny_model, "ddim", 5, num=3, seed=1, progress=False)
    b = sample(tiny_model, "ddim", 5, num=3, seed=1, progress=False)
    c = sample(tiny_model, "ddim", 5, num=3, seed=2, progress=False)
    assert a.shape == (3, 1, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_deterministic_schedulers_do_not_depend_on_batching(tiny_model):
    whole = sample(tiny_model, "ddim", 4, num=4, seed=0, batch_size=4, progress=False)
    split = sample(tiny_model, "ddim", 4, num=4, seed=0, batch_size=3, progress=False)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm-solver"])
def test_each_scheduler_visits_its_steps_in_order(tiny_model, kind):
    scheduler = make_scheduler(kind, tiny_model.scheduler_config, 10)
    seen = []
    denoise(lambda x, t: torch.zeros_like(x), scheduler, torch.randn(2, 1, 8, 8),
            on_step=lambda i, t, x: seen.append(t))
    assert len(seen) == 10 and seen == sorted(seen, reverse=True) and seen[0] >= 900


def test_bad_scheduler_arguments(tiny_model):
    with pytest.raises(QtoolkitError, match="unknown scheduler"):
        make_scheduler("euler", tiny_model.scheduler_config, 10)
    with pytest.raises(QtoolkitError, match="--steps must be between 1 and 1000"):
        make_scheduler("ddim", tiny_model.scheduler_config, 0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_x0_clipping_follows_the_models_scheduler_config(tiny_model, kind):
    def draw(clip):
        tiny_model.scheduler_config = {**tiny_model.scheduler_config, "clip_sample": clip}
        # A network that always predicts negative noise: the implied x_0 runs far above 1.
        return denoise(lambda x, t: -3 * torch.ones_like(x), make_scheduler(kind, tiny_model.scheduler_config, 10),
                       torch.randn(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    clipped, free = draw(True), draw(False)
    assert free.max() > 2
    assert clipped.max() < 1.2  # x_0 clipped to [-1, 1] at every step; the last step adds sqrt(1 - alpha_bar_0) noise


def test_a_cpu_network_gets_at_most_cpu_call_batch_samples_a_call_and_the_chains_are_unchanged(tiny_model):
    network, calls = unet_predictor(tiny_model.unet), []

    def recorded(x, t):
        calls.append(x.shape[0])
        return network(x, t)

    num = 2 * CPU_CALL_BATCH + 5
    chunked = sample(tiny_model, "ddim", 3, num=num, seed=0, batch_size=num, eps=recorded, progress=False)
    assert max(calls) == CPU_CALL_BATCH and calls[:3] == [CPU_CALL_BATCH, CPU_CALL_BATCH, 5]
    scheduler = make_scheduler("ddim", tiny_model.scheduler_config, 3)
    x_T = torch.randn((num, *tiny_model.sample_shape), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked, denoise(network, scheduler, x_T), rtol=1e-5, atol=1e-5)  # whole batches
    x, t = torch.randn(num, 1, 8, 8), torch.arange(num)
    assert torch.equal(in_cpu_calls(lambda x, t: x * t[:, None, None, None])(x, t), x * t[:, None, None, None])
