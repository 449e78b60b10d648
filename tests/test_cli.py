import subprocess
import sys

import numpy as np
import pytest

from qtoolkit.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qtoolkit.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "no-such-model", "--out", "x"], "neither a bundled name"),
    (["sample", "--model", ".", "--out", "x"], "not a diffusers model folder"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sample_writes_grid_and_npz_and_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tiny_model_dir), "--steps", "3", "--num", "5", "--out", str(out)]
    assert main(args) == 0
    assert (out / "grid.png").stat().st_size > 0
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (5, 1, 8, 8)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_missing_dataset_and_truncated_weights_are_one_line_errors(tiny_model_dir, tmp_path):
    r = run_cli("train-classifier", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr and "Traceback" not in r.stderr
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    r = run_cli("sample", "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
