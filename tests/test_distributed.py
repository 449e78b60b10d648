import os
import subprocess
import sys

import numpy as np


def run_alone_and_under_torchrun(args: list[str], one, two) -> tuple[subprocess.CompletedProcess, ...]:
    """`qtoolkit ARGS --out ONE` in one process, then `... --out TWO` under torchrun with two processes; one thread
    per process, so that the runs differ only in the sharing out. Returns both (each checked to succeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "qtoolkit.cli", *args, "--out", str(one)],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "qtoolkit.cli", "--", *args, "--out", str(two)],
                           env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr
    return single, multi


def test_torchrun_sampling_equals_a_single_process(tiny_model_dir, tmp_path):
    args = ["sample", "--model", str(tiny_model_dir), "--scheduler", "ddpm", "--steps", "3", "--num", "5",
            "--batch-size", "2", "--seed", "7"]
    run_alone_and_under_torchrun(args, tmp_path / "one", tmp_path / "two")
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert a["samples"].shape == (5, 1, 8, 8)
        np.testing.assert_array_equal(a["samples"], b["samples"])
