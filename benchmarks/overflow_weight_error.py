"""What each overflow fix does to the weights alone: the squared error of the frozen weight codes against the float
weights, summed over every quantized layer, and the pairs of codes over the int16 limit, per fix.

Weights do not depend on the calibration set, so one batch of random network inputs fixes the activation
quantizers that freezing needs; the weight figures are those of any run of the same model and QuantConfig.

    python benchmarks/overflow_weight_error.py --model fmnist-ddpm pulfer-fmnist
"""

from __future__ import annotations

import argparse

import torch

from qtoolkit.graph import calibrate, freeze, quant_ops
from qtoolkit.models import load_diffusion_model
from qtoolkit.ptq import quantized_graph
from qtoolkit.quant import QuantConfig
from qtoolkit.quant.overflow import PAIR_LIMIT, pairings

FIXES = ("none", "weight-pairs", "weights-7bit")


def pairs_over_the_limit(codes: torch.Tensor, parts: tuple[int, ...]) -> int:
    rows = codes.reshape(codes.shape[0], -1)
    over = 0
    for pairs in pairings(codes.shape[1], rows.shape[1] // codes.shape[1], parts):
        a, b = rows[:, pairs[:, 0]], rows[:, pairs[:, 1]]
        over += int(((a * b > 0) & ((a + b).abs() > PAIR_LIMIT)).sum())
    return over


def weight_figures(model, fix: str) -> dict:
    _fp_graph, qgraph = quantized_graph(model, QuantConfig(overflow_fix=fix))
    generator = torch.Generator().manual_seed(0)
    with calibrate(qgraph):
        qgraph(torch.randn(8, *model.sample_shape, generator=generator), torch.randint(0, 1000, (8,), generator=generator))
    freeze(qgraph)
    error, over, weights = 0.0, 0, 0
    for op in quant_ops(qgraph).values():
        if op.weight is None:
            continue
        weight = qgraph.get_parameter(op.weight_target).detach()
        params = op.weight.params
        error += float((params.fake_quantize(weight) - weight).pow(2).sum())
        over += pairs_over_the_limit(params.quantize(weight), (0, weight.shape[1]))
        weights += weight.numel()
    return {"error": error, "over": over, "weights": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["fmnist-ddpm"], help="bundled names or model folders")
    a = p.parse_args()
    print("| model | overflow_fix | squared weight error | over none's | pairs over the limit | weights |")
    print("|---|---|---|---|---|---|")
    for name in a.model:
        model = load_diffusion_model(name)
        figures = {fix: weight_figures(model, fix) for fix in FIXES}
        for fix, f in figures.items():
            added = f["error"] - figures["none"]["error"]
            print(f"| {name} | {fix} | {f['error']:.4g} | +{added:.3g} | {f['over']:,} | {f['weights']:,} |")


if __name__ == "__main__":
    main()
