"""`qtoolkit run` quantizes, end to end, the kinds of network people use, each at small size: a cross-attention
UNet2DConditionModel and a class-conditional DiT (diffusers), and a third-party plain-PyTorch DDPM loaded by a
model-loader plugin. (UNet2DModel, the bundled model's and the CIFAR-10 architecture, run in test_recipe.py
and test_cli.py.)"""

import json
from pathlib import Path

import pytest
import torch
from test_recipe import FMNIST, SMALL, sets

from qtoolkit.cli import main
from qtoolkit.graph import QuantizedAttention, quant_ops
from qtoolkit.models import load_diffusion_model

PULFER = Path(__file__).resolve().parent.parent.parent / "shared" / "external" / "ddpm_fashion_pulfer.pt"


def run_recipe(model: str, tmp_path, capsys, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "run"
    args = ["run", str(FMNIST), *sets(f"model={model}", *SMALL, "backend=none", *extra), "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((out / "report.json").read_text()), out


def check_quantized_run(report: dict, out: Path, kinds: set[str]) -> None:
    result = report["W8A8-ndtc-bc"]
    assert 5 < result["sqnr_db_mean"] < 80  # quantized: close to FP, not a copy of it
    qgraph = load_diffusion_model(out).unet  # the run's model reloads as a frozen quantized graph
    assert {op.kind for op in quant_ops(qgraph).values()} == kinds
    assert all(op.is_frozen for op in quant_ops(qgraph).values())
    listed = report["quantized_ops"]  # every quantized op with its scales, in report.json
    assert sum(listed["counts"].values()) == len(quant_ops(qgraph))


def test_a_cross_attention_unet_with_random_text_embeddings(tiny_condition_unet_dir, tmp_path, capsys):
    report, out = run_recipe(str(tiny_condition_unet_dir), tmp_path, capsys,
                             "conditioning.encoder_hidden_states={source: random, seed: 0, sequence_length: 4}",
                             "quantization.quantize_attention_matmuls=true")
    check_quantized_run(report, out, {"conv2d", "linear", "attention"})
    ops = quant_ops(load_diffusion_model(out).unet).values()
    # Cross-attention reads the text embedding: its key/value projections and matmuls are quantized too.
    assert any(op.path.endswith("attn2.to_k") for op in ops)
    assert sum(isinstance(op, QuantizedAttention) for op in ops) >= 2


def test_a_class_conditional_dit(tiny_dit_dir, tmp_path, capsys):
    report, out = run_recipe(str(tiny_dit_dir), tmp_path, capsys, "conditioning.class_labels=2")
    check_quantized_run(report, out, {"linear"})  # its one convolution, the patch embedding, is the first layer


@pytest.mark.skipif(not PULFER.is_file(), reason=f"the third-party checkpoint is not at {PULFER} (../shared/external)")
def test_the_third_party_fashion_mnist_ddpm(tmp_path, capsys):
    report, out = run_recipe(str(PULFER), tmp_path, capsys)
    check_quantized_run(report, out, {"conv2d"})  # its linear layers all embed the timestep: kept in float
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 999])
    with torch.no_grad():
        assert load_diffusion_model(out).denoiser()(x, t).shape == (3, 1, 28, 28)
