"""The third-party DDPM plugin (plugins/pulfer_ddpm.py): Pulfer's Fashion-MNIST checkpoint loads strictly into the
network written here, the loader claims its name and .pt paths through the registry, wrong files are one clear
error, sampling runs, and the network is capturable by torch.export with a dynamic batch (what graph
quantization traces)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from qtoolkit import plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.models.loading import DiffusionModel, load_diffusion_model
from qtoolkit.sampling import sample
from qtoolkit_plugins import pulfer_ddpm
from qtoolkit_plugins.pulfer_ddpm import CHECKPOINT_ENV, MODEL_NAME, WRAPPER_PREFIX, PulferUNet

SHARED_EXTERNAL = Path(__file__).resolve().parent.parent.parent / "shared" / "external"
CHECKPOINT = SHARED_EXTERNAL / pulfer_ddpm.CHECKPOINT_FILE
# PROVENANCE.md beside the checkpoint: the author's UNet has 606,852 parameters (the time table included).
PROVENANCE_PARAMETERS = 606_852

needs_checkpoint = pytest.mark.skipif(not SHARED_EXTERNAL.is_dir(), reason=f"the external test material "
                                      f"{SHARED_EXTERNAL} is absent (CI has it at ../shared beside the checkout)")


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reload()
    yield
    plugins.reload()


@pytest.fixture
def pulfer_model(monkeypatch) -> DiffusionModel:
    monkeypatch.setenv(CHECKPOINT_ENV, str(CHECKPOINT))
    return load_diffusion_model(MODEL_NAME)


def random_checkpoint(path: Path, prefix: str = WRAPPER_PREFIX) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {prefix + key: value for key, value in PulferUNet().state_dict().items()}
    torch.save(state, path)
    return state


@needs_checkpoint
def test_the_real_checkpoint_loads_strictly_by_name(pulfer_model):
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(key.startswith(WRAPPER_PREFIX) for key in state)
    network = PulferUNet()
    network.load_state_dict({key.removeprefix(WRAPPER_PREFIX): value for key, value in state.items()}, strict=True)
    assert sum(t.numel() for t in network.state_dict().values()) == PROVENANCE_PARAMETERS
    loaded = pulfer_model.unet.state_dict()
    assert all(torch.equal(loaded[key.removeprefix(WRAPPER_PREFIX)], value) for key, value in state.items())
    assert pulfer_model.sample_shape == (1, 28, 28) and not pulfer_model.unet.training
    assert Path(pulfer_model.path).samefile(CHECKPOINT)


def test_the_loader_claims_its_name_and_pt_files_only(tmp_path):
    checkpoint = tmp_path / "other-name.pt"
    random_checkpoint(checkpoint)
    loader = plugins.registry().records["register_model_loaders"][MODEL_NAME]
    assert loader.claims(MODEL_NAME) and loader.claims(str(checkpoint))
    assert not loader.claims(str(tmp_path / "absent.pt")) and not loader.claims(str(tmp_path))
    assert not loader.claims("fmnist-ddpm")


@pytest.mark.parametrize("prefix", [WRAPPER_PREFIX, ""])
def test_a_pt_path_loads_with_or_without_the_wrapper_prefix(tmp_path, prefix):
    state = random_checkpoint(tmp_path / "model.pt", prefix)
    model = load_diffusion_model(tmp_path / "model.pt")
    loaded = model.unet.state_dict()
    assert all(torch.equal(loaded[key.removeprefix(prefix)], value) for key, value in state.items())


def one_line_error(source) -> str:
    with pytest.raises(QtoolkitError) as caught:
        load_diffusion_model(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_pt_file_of_another_network_is_one_clear_error(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "classifier.pt")
    message = one_line_error(tmp_path / "classifier.pt")
    assert "classifier.pt is not a checkpoint of Pulfer's DDPM UNet" in message and "missing keys" in message


def test_a_pt_file_of_another_shape_names_the_key(tmp_path):
    state = random_checkpoint(tmp_path / "wide.pt")
    state[WRAPPER_PREFIX + "conv_out.weight"] = torch.zeros(2, 10, 3, 3)
    torch.save(state, tmp_path / "wide.pt")
    assert "1 keys of another shape (first 'conv_out.weight')" in one_line_error(tmp_path / "wide.pt")


def test_a_pt_file_that_is_no_state_dict_is_one_clear_error(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a zip archive")
    assert "is not a PyTorch state_dict" in one_line_error(tmp_path / "broken.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "holds a list, not a state_dict" in one_line_error(tmp_path / "list.pt")


def test_non_finite_weights_are_refused(tmp_path):
    state = random_checkpoint(tmp_path / "diverged.pt")
    state[WRAPPER_PREFIX + "b1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "diverged.pt")
    assert "'b1.0.conv1.weight' holds 1 NaN/inf" in one_line_error(tmp_path / "diverged.pt")


def test_a_missing_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pulfer_ddpm, "REPOSITORY_ROOT", tmp_path / "checkout")
    message = one_line_error(MODEL_NAME)
    assert CHECKPOINT_ENV in message and str(tmp_path / "shared" / "external" / "ddpm_fashion_pulfer.pt") in message
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "elsewhere.pt"))
    assert f"{CHECKPOINT_ENV}={tmp_path / 'elsewhere.pt'} is not a file" in one_line_error(MODEL_NAME)


@needs_checkpoint
def test_a_few_ddim_steps_give_finite_samples_of_the_right_shape(pulfer_model):
    x = sample(pulfer_model, "ddim", steps=4, num=3, seed=0, batch_size=2, progress=False)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()


@needs_checkpoint
def test_the_network_is_captured_by_torch_export_with_a_dynamic_batch(pulfer_model):
    denoiser = pulfer_model.denoiser()
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.randn(2, 1, 28, 28), torch.tensor([999, 10]))
    started = time.perf_counter()
    exported = torch.export.export(denoiser, example, dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch}})
    print(f"torch.export of the Pulfer UNet: {time.perf_counter() - started:.1f} s")
    x, t = torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 250, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, t), denoiser(x, t))
