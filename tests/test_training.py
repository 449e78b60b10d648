import json

import torch
from safetensors.torch import load_file

from qtoolkit.training.ddpm import TrainConfig, train_ddpm


def _weights(run):
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resumed_training_equals_a_straight_run(tmp_path):
    cfg = dict(batch_size=4, checkpoint_every=2, warmup_steps=2, bf16=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_ddpm(straight, TrainConfig(steps=3, **cfg))
    train_ddpm(resumed, TrainConfig(steps=2, **cfg))
    train_ddpm(resumed, TrainConfig(steps=3, **cfg))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    assert json.loads((resumed / "train_config.json").read_text())["batch_size"] == 4
