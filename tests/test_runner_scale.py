"""`qtoolkit run` at scale: the job shared out over torchrun processes, and an interrupted run resumed.

Both must end where one uninterrupted process ends: the same calibration set, scales, bias corrections and
report figures. The torchrun test runs both sides with one thread per process, so that the only difference
between them is the sharing out (a kernel's thread count may change how it adds up floats).
"""

import json

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

import qtoolkit.ptq
from qtoolkit.cli import main
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, save_diffusion_model

from conftest import TINY_UNET
from test_distributed import run_alone_and_under_torchrun
from test_recipe import FMNIST, error_line, sets

# Every stage shared out over two processes has at least two batches to share: 4 chain batches (16 chains of 10
# inputs, 4 chains a batch), 40 observer batches of 4, 2 bias-correction chunks of 64, 2 sample batches of 256.
SHARED = ["calibration.size=160", "calibration.steps=4", "calibration.inputs_per_chain=10", "calibration.batch_size=4",
          "bias_correction.samples=100", "report.num=260", "report.steps=3", "report.error_num=3", "threads=1"]


def _figures(run) -> dict:
    """What a run folder says it measured and made, to compare two runs by."""
    report = json.loads((run / "report.json").read_text())
    ptq = json.loads((run / "ptq.json").read_text())
    name = next(key for key in report if key.startswith("W8A8"))
    calibration = load_file(run / "calibration" / "calibration.safetensors")
    model = load_file(next((run / "model").rglob("*.safetensors")))
    return {"per_timestep": report["per_timestep"], "agreement": report[name]["agreement"],
            "sqnr": (report[name]["sqnr_db_mean"], report[name]["sqnr_db_min"]),
            "bias_correction": ptq["bias_correction"], "cost": ptq["calibration_cost"],
            "calibration": {k: v.numpy().tobytes() for k, v in calibration.items()},
            "model": {k: v.numpy().tobytes() for k, v in model.items()}}


def test_torchrun_shares_the_job_out_and_ends_where_one_process_does(tmp_path):
    # 3-channel images: the report skips the distribution metrics (Fashion-MNIST's features), which embed the
    # reference set in each process for a minute, and compares the samples themselves (PSNR/SSIM against FP).
    torch.manual_seed(0)
    model = tmp_path / "tiny-rgb"
    save_diffusion_model(UNet2DModel(**{**TINY_UNET, "in_channels": 3, "out_channels": 3}),
                         dict(DEFAULT_SCHEDULER_CONFIG), model)
    args = ["run", str(FMNIST), *sets(f"model={model}", *SHARED)]
    single, multi = run_alone_and_under_torchrun(args, tmp_path / "one", tmp_path / "two")
    one, two = _figures(tmp_path / "one"), _figures(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        assert one[key] == two[key], key
    # Shared out: rank 0's bars (it speaks for both) count half the chain steps and observer batches.
    assert "calibration ndtc: 59/59 step" in single.stdout and "calibration ndtc: 29/29 step" in multi.stdout
    assert "calibrate: 40/40 batch" in single.stdout and "calibrate: 20/20 batch" in multi.stdout
    assert (tmp_path / "two" / "report.md").is_file()
    # Rank 0 wrote the run folder; the other process left nothing beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny-rgb", "two"]


class Interrupted(KeyboardInterrupt):
    pass


def _interrupt(*args, **kwargs):
    raise Interrupted


@pytest.mark.parametrize("stage", ["after the calibration set", "after the quantized model"])
def test_an_interrupted_run_resumes_to_the_same_run_folder(stage, tiny_model_dir, tmp_path, monkeypatch, capsys):
    args = ["run", str(FMNIST), *sets(f"model={tiny_model_dir}", "calibration.size=16", "calibration.steps=4",
                                      "calibration.inputs_per_chain=4", "bias_correction.samples=8", "report.num=1",
                                      "report.steps=3", "report.error_num=2")]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        if stage == "after the calibration set":
            patch.setattr(qtoolkit.ptq, "calibrate_and_freeze", _interrupt)
        else:
            patch.setattr("qtoolkit.runner.compare_to_fp", _interrupt)
        assert main([*args, "--out", str(out)]) == 130
    assert not out.exists()
    partial = tmp_path / ".resumed.partial"
    assert (partial / "calibration").is_dir()
    assert (partial / "ptq.json").is_file() == (stage == "after the quantized model")
    assert "--resume continues from them" in capsys.readouterr().err

    assert main([*args, "--out", str(out)]) == 2  # never started over silently
    assert "pass --resume to continue it, or --overwrite" in error_line(capsys)
    assert main([*args, "--set", "calibration.size=32", "--out", str(out), "--resume"]) == 2  # another job
    assert "made with another recipe (it differs in: calibration)" in error_line(capsys)

    assert main([*args, "--out", str(out), "--resume"]) == 0
    resumed_from = "the quantized model" if stage == "after the quantized model" else "the calibration set"
    assert f"resumed: {resumed_from}" in capsys.readouterr().out
    assert not partial.exists()
    whole, resumed = _figures(tmp_path / "whole"), _figures(out)
    for key in whole:
        if key != "cost" or stage == "after the quantized model":
            assert whole[key] == resumed[key], key


def test_resume_says_when_there_is_nothing_to_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never-started"
    assert main(["run", str(FMNIST), *sets(f"model={tiny_model_dir}"), "--out", str(out), "--resume"]) == 2
    assert "nothing to resume: no interrupted run of" in error_line(capsys)
