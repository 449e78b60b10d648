"""Where fbgemm's time goes on the CIFAR-10 architecture: torch.profiler's per-op table of one UNet forward on the
fbgemm backend and on PyTorch FP32 eager, the same graph packed for torch's plain `fbgemm` engine instead of its
`x86` engine (the backend's choice), and the attention kernel both run in float, timed as SDPA against matmul +
softmax (the alternative tried for it).

    python benchmarks/torch_int8_profile.py --batch 16          # 2 threads, about 2 minutes

Same model and calibration as benchmarks/int8_speed.py (random weights, forward-noised inputs), W8A8 with
quantized convolution outputs (what fbgemm needs).
"""

from __future__ import annotations

import time
from typing import Annotated

import torch
import typer

from qtoolkit.deploy import lower_graph  # first: qtoolkit quiets torchao's import noise before diffusers
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel
from qtoolkit.ptq import calibrate_and_freeze, quantized_graph
from qtoolkit.quant import QuantConfig
from qtoolkit_plugins.torch_int8_backend import lower_on_engine

from int8_speed import CIFAR10_DDPM, calibration_inputs  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402


def _times(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _best_ms(fn, repeats: int = 5) -> float:
    return min(_times(fn, repeats)) * 1e3


def main(batch: Annotated[int, typer.Option(help="batch size of the profiled forward")] = 16,
         threads: Annotated[int, typer.Option(help="torch threads")] = 2,
         rows: Annotated[int, typer.Option(help="ops listed per table")] = 14) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_DDPM).eval()
    model = DiffusionModel(unet, dict(DEFAULT_SCHEDULER_CONFIG), "cifar10-ddpm-random")
    _, qgraph = quantized_graph(model, QuantConfig(quantize_conv_outputs=True))
    qgraph = calibrate_and_freeze(qgraph, calibration_inputs((3, 32, 32), 64, 0), batch_size=16, progress=False)
    fbgemm, plain_fbgemm = lower_graph(qgraph, "fbgemm"), lower_on_engine(qgraph, "fbgemm")
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    x_last = x.contiguous(memory_format=torch.channels_last)  # as qtoolkit.deploy.DeployedModel passes it
    runs = {"pytorch-fp32-eager": lambda: unet(x, t), "fbgemm": lambda: fbgemm(x_last, t),
            "fbgemm, torch's plain fbgemm engine": lambda: plain_fbgemm(x_last, t)}
    with torch.no_grad():
        times = {name: [] for name in runs}
        for _ in range(3):  # alternating rounds: the machine's drift falls on every run alike
            for name, run in runs.items():
                times[name] += _times(run, 2)
        for name in runs:
            print(f"{name}: best of 6 forwards at batch {batch}, {threads} threads: {min(times[name]) * 1e3:.1f} ms")
        for name in ["pytorch-fp32-eager", "fbgemm"]:
            with torch.profiler.profile() as profile:
                runs[name]()
            print(f"{name}:")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        heads = CIFAR10_DDPM["block_out_channels"][1] // 8  # diffusers' default attention_head_dim 8
        q, k, v = (torch.randn(batch, heads, 16 * 16, 8) for _ in range(3))
        sdpa = _best_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        math = _best_ms(lambda: (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1) @ v)
        print(f"attention at 16x16, {heads} heads of dimension 8, batch {batch}: scaled_dot_product_attention "
              f"{sdpa:.1f} ms, matmul + softmax {math:.1f} ms")


if __name__ == "__main__":
    typer.run(main)
