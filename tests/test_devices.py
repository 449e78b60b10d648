"""The recipe's `device` (qtoolkit.devices): resolved before any work, an absent device refused in one line."""

import pytest
import torch

from qtoolkit.cli import main
from qtoolkit.devices import resolve_device
from qtoolkit.errors import QtoolkitError

from test_recipe import FMNIST, error_line, sets


def test_auto_is_the_cpu_on_a_machine_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


def test_cuda_follows_torchruns_local_rank_and_a_missing_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(QtoolkitError, match=r"device cuda:2 was asked for \(GPU 2\), and torch sees 2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device, message", [
    ("gpu", "device 'gpu' is not one of auto (the first accelerator present, else the CPU), cpu, cuda, cuda:N or mps"),
    ("cuda", "device cuda was asked for, and torch"),
    ("cuda:1", "device cuda:1 was asked for, and torch"),
    ("mps", "device mps was asked for, and torch sees no Apple GPU"),
])
def test_an_unknown_or_absent_device_is_one_line_before_any_work(device, message, tiny_model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["run", str(FMNIST), *sets(f"model={tiny_model_dir}", f"device={device}"), "--out", str(out)]) == 2
    assert message in error_line(capsys)
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
