"""Conditional diffusers networks (UNet2DConditionModel, DiTTransformer2DModel) driven through `model.denoiser()`:
loading their folders, the recipe's conditioning section, sampling, calibration chains and graph capture."""

import copy
import io
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qtoolkit.calibration import generate_calibration_set
from qtoolkit.errors import QtoolkitError
from qtoolkit.models import load_diffusion_model
from qtoolkit.models.conditioning import apply_conditioning
from qtoolkit.recipe import DEFAULT_SEQUENCE_LENGTH, Conditioning, recipe_from_dict
from qtoolkit.runner import prepare
from qtoolkit.sampling import sample

# What each tiny network is conditioned on in these tests, as a recipe's conditioning section.
CONDITIONING = {"unet": {"encoder_hidden_states": {"source": "random", "seed": 0}}, "dit": {"class_labels": 3}}
# diffusers' Upsample2D branches on `batch >= 64` (a workaround for a large-batch kernel bug), so a graph of a
# UNet captured at batch 2 holds only for batches up to 63: export refuses an unbounded batch dimension.
BATCH = torch.export.Dim("batch", max=63)


@pytest.fixture(params=["unet", "dit"])
def kind(request):
    return request.param


@pytest.fixture
def network_and_dir(kind, tiny_condition_unet, tiny_condition_unet_dir, tiny_dit, tiny_dit_dir):
    return (tiny_condition_unet, tiny_condition_unet_dir) if kind == "unet" else (tiny_dit, tiny_dit_dir)


def conditioned(folder, section):
    return apply_conditioning(load_diffusion_model(folder), Conditioning.model_validate(section))


@pytest.fixture
def model(kind, network_and_dir):
    return conditioned(network_and_dir[1], CONDITIONING[kind])


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def raw_call(network, conditioning, x, t):
    """The network called as diffusers' pipelines call it, with the conditioning given for the whole batch."""
    batched = {name: value.expand(x.shape[0], *value.shape[1:]) for name, value in conditioning.items()}
    return network(x, t, **batched).sample


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_pipeline_and_bare_folders_load_with_their_sample_shape(kind, network_and_dir, layout):
    network, folder = network_and_dir
    folder = folder if layout == "pipeline" else folder / ("unet" if kind == "unet" else "transformer")
    loaded = conditioned(folder, CONDITIONING[kind])
    assert type(loaded.unet) is type(network)
    assert loaded.sample_shape == (1, 8, 8)
    x, t = inputs()
    torch.testing.assert_close(raw_call(loaded.unet, loaded.conditioning, x, t),
                               raw_call(network, loaded.conditioning, x, t), rtol=0, atol=0)


def test_denoiser_broadcasts_the_conditioning_and_gives_the_noise_half_of_a_learned_sigma_output(model):
    x, t = inputs()
    noise = model.denoiser()(x, t)
    assert noise.shape == x.shape
    out = raw_call(model.unet, model.conditioning, x, t)
    # The tiny DiT predicts noise and variance (2 channels for 1); the UNet predicts the noise alone.
    torch.testing.assert_close(noise, out[:, :1], rtol=0, atol=0)


def test_conditioning_is_part_of_the_denoisers_state_and_survives_deepcopy(kind, model):
    denoiser = model.denoiser()
    name = next(iter(model.conditioning))
    state = denoiser.state_dict()
    torch.testing.assert_close(state[f"conditioning.{name}"], model.conditioning[name], rtol=0, atol=0)
    x, t = inputs()
    torch.testing.assert_close(copy.deepcopy(denoiser)(x, t), denoiser(x, t), rtol=0, atol=0)


def test_ddim_sampling_draws_images_that_depend_on_the_conditioning(kind, network_and_dir):
    folder = network_and_dir[1]
    other = {"unet": {"encoder_hidden_states": {"source": "random", "seed": 1}}, "dit": {"class_labels": 0}}[kind]
    drawn = [sample(conditioned(folder, section), "ddim", 3, num=2, seed=0, progress=False)
             for section in (CONDITIONING[kind], other)]
    assert drawn[0].shape == (2, 1, 8, 8) and torch.isfinite(drawn[0]).all()
    assert not torch.allclose(drawn[0], drawn[1])


def test_the_denoiser_exports_with_a_dynamic_batch_and_keeps_the_conditioning(model, tmp_path):
    denoiser = model.denoiser()
    exported = torch.export.export(denoiser, inputs(2), dynamic_shapes={"sample": {0: BATCH}, "timestep": {0: BATCH}})
    name = next(iter(model.conditioning))
    assert f"conditioning.{name}" in exported.state_dict
    x, t = inputs(3)  # another batch than the example's
    torch.testing.assert_close(exported.module()(x, t), denoiser(x, t), rtol=1e-5, atol=1e-5)
    saved = io.BytesIO()
    torch.export.save(exported, saved)
    saved.seek(0)
    torch.testing.assert_close(torch.export.load(saved).module()(x, t), denoiser(x, t), rtol=1e-5, atol=1e-5)


def test_calibration_chains_call_the_network_with_the_conditioning(kind, model):
    seen = []
    model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({k: v.shape[0] for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    calibration = generate_calibration_set("uniform", model, 4, scheduler="ddim", steps=3, batch_size=2,
                                           progress=False)
    assert calibration.x.shape == (4, 1, 8, 8) and torch.isfinite(calibration.x).all()
    name = next(iter(model.conditioning))
    assert seen and all(call.get(name) == 2 for call in seen)  # every call, broadcast to the chain batch


def test_random_zeros_and_file_encoder_hidden_states(tiny_condition_unet_dir, tmp_path):
    def hidden(section):
        return conditioned(tiny_condition_unet_dir, {"encoder_hidden_states": section}).conditioning[
            "encoder_hidden_states"]

    random = hidden({"source": "random"})
    assert random.shape == (1, DEFAULT_SEQUENCE_LENGTH, 4)  # width: the UNet's cross_attention_dim
    torch.testing.assert_close(hidden({"source": "random", "seed": 0}), random, rtol=0, atol=0)
    assert not torch.equal(hidden({"source": "random", "seed": 1}), random)
    assert torch.equal(hidden({"source": "zeros", "sequence_length": 5}), torch.zeros(1, 5, 4))
    embedding = torch.randn(5, 4, dtype=torch.float16)
    save_file({"prompt": embedding, "other": torch.zeros(1)}, str(tmp_path / "emb.safetensors"))
    from_file = hidden({"source": "file", "path": str(tmp_path / "emb.safetensors"), "key": "prompt"})
    torch.testing.assert_close(from_file, embedding.float()[None], rtol=0, atol=0)


def section_error(section):
    """The error of a recipe whose conditioning section is `section`."""
    recipe = {"schema_version": 1, "description": "x", "model": "m", "calibration": {"strategy": "uniform"},
              "conditioning": section}
    with pytest.raises(QtoolkitError) as caught:
        recipe_from_dict(recipe, "r.yaml")
    return str(caught.value)


@pytest.mark.parametrize("section, expected", [
    ({"encoder_hidden_states": {"source": "random", "sedd": 1}},
     "r.yaml: unknown key 'conditioning.encoder_hidden_states.sedd': did you mean 'seed'?"),
    ({"encoder_hidden_states": {"source": "noise"}},
     "r.yaml: conditioning.encoder_hidden_states.source: input should be 'random', 'zeros' or 'file', got 'noise'"),
    ({"encoder_hidden_states": {"source": "zeros", "seed": 1}},
     "r.yaml: conditioning.encoder_hidden_states: seed does not go with source zeros, which takes sequence_length"),
    ({"encoder_hidden_states": {"source": "file"}}, "r.yaml: conditioning.encoder_hidden_states: source file needs path"),
    ({"encoder_hidden_states": {"source": "random", "sequence_length": 0}},
     "r.yaml: conditioning.encoder_hidden_states.sequence_length: input should be greater than or equal to 1"),
    ({"class_labels": -1}, "r.yaml: conditioning.class_labels: input should be greater than or equal to 0"),
    ({"class_labels": "3"}, "r.yaml: conditioning.class_labels: input should be a valid integer"),
    ({"prompt": "a cat"},
     "r.yaml: unknown key 'conditioning.prompt': valid keys here: class_labels, encoder_hidden_states"),
])
def test_bad_conditioning_sections_are_one_line_with_the_dotted_key(section, expected):
    error = section_error(section)
    assert error.startswith(expected) and "\n" not in error


def network_error(folder, section):
    with pytest.raises(QtoolkitError) as caught:
        conditioned(folder, section)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_conditioning_that_does_not_fit_the_network_is_refused_naming_the_key(tiny_condition_unet_dir, tiny_dit_dir,
                                                                               tmp_path):
    assert "needs encoder_hidden_states on every call: set conditioning.encoder_hidden_states in the recipe" in \
        network_error(tiny_condition_unet_dir, {})
    assert "set conditioning.class_labels in the recipe" in network_error(tiny_dit_dir, {})
    assert "conditioning.class_labels = 4 is not a class of this DiTTransformer2DModel: use 0 to 3 " \
           "(num_embeds_ada_norm = 4)" in network_error(tiny_dit_dir, {"class_labels": 4})
    assert "takes encoder_hidden_states, not class_labels: remove conditioning.class_labels" in network_error(
        tiny_condition_unet_dir, {"encoder_hidden_states": {"source": "zeros"}, "class_labels": 0})
    assert "takes class_labels, not encoder_hidden_states" in network_error(
        tiny_dit_dir, {"encoder_hidden_states": {"source": "zeros"}, "class_labels": 0})
    file = tmp_path / "emb.safetensors"
    save_file({"a": torch.zeros(1, 5, 7), "b": torch.zeros(5, 4)}, str(file))
    for key, expected in ((None, "holds 2 tensors (a, b): name one with conditioning.encoder_hidden_states.key"),
                          ("c", "holds no tensor 'c'; it holds: a, b"),
                          ("a", "is torch.float32 (1, 5, 7): the network attends to one sequence of 4-wide")):
        assert expected in network_error(tiny_condition_unet_dir, {"encoder_hidden_states": {
            "source": "file", "path": str(file), "key": key}})
    assert "is not a file" in network_error(tiny_condition_unet_dir, {"encoder_hidden_states": {
        "source": "file", "path": str(tmp_path / "missing.safetensors")}})


def test_a_conditional_model_without_conditioning_is_refused_before_its_first_call(tiny_dit_dir):
    with pytest.raises(QtoolkitError, match="needs class_labels on every call: set conditioning.class_labels"):
        load_diffusion_model(tiny_dit_dir).denoiser()


def test_unknown_network_classes_are_refused_listing_the_supported_ones(tiny_dit_dir, tmp_path):
    folder = shutil.copytree(tiny_dit_dir / "transformer", tmp_path / "other")
    config = folder / "config.json"
    config.write_text(config.read_text().replace("DiTTransformer2DModel", "SD3Transformer2DModel"))
    with pytest.raises(QtoolkitError, match="describes a 'SD3Transformer2DModel', but qtoolkit reads these diffusers "
                                            "networks: UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
        load_diffusion_model(folder)


def test_the_runner_applies_the_recipes_conditioning_before_any_work(tiny_condition_unet_dir):
    recipe = {"schema_version": 1, "description": "x", "model": str(tiny_condition_unet_dir),
              "calibration": {"strategy": "uniform"}, "backend": "none", "report": {"enabled": False}}
    with pytest.raises(QtoolkitError, match="set conditioning.encoder_hidden_states in the recipe"):
        prepare(recipe_from_dict(dict(recipe), "r.yaml"))
    job = prepare(recipe_from_dict({**recipe, "conditioning": {"encoder_hidden_states": {"source": "zeros"}}}, "r.yaml"))
    assert job.model.conditioning["encoder_hidden_states"].shape == (1, DEFAULT_SEQUENCE_LENGTH, 4)
    # The resolved recipe the run writes says which conditioning it used, defaults filled in.
    assert "encoder_hidden_states:\n    source: zeros\n    seed: null\n    sequence_length: 77" in job.recipe.to_yaml()


def test_a_config_beside_another_networks_weights_is_refused(tiny_model_dir):
    """diffusers only warns, and leaves the network's tensors that the file lacks randomly initialized."""
    config = tiny_model_dir / "unet" / "config.json"
    config.write_text(config.read_text().replace('"UNet2DModel"', '"UNet2DConditionModel"'))
    with pytest.raises(QtoolkitError, match="does not hold the weights of the UNet2DConditionModel its config.json "
                                            r"describes: 0 of its tensors missing, \d+ unknown ones"):
        load_diffusion_model(tiny_model_dir)
