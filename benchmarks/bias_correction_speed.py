"""Bias correction: one walk of the quantized graph against the op-by-op definition, on the same frozen graph.

`correct_bias_op_by_op` is the definition (and the implementation before the walk): for each op with a bias, in
execution order, run the quantized graph up to that op's output and shift its bias by the FP mean minus that
output's mean. Its cost grows with the number of ops times the inputs; qtoolkit.graph.bias_correction walks the
graph once. The script times both on one model quantized W8A8 with quantized convolution outputs (as the
recipes do), checks that their biases agree bit for bit, and prints a table:

    python benchmarks/bias_correction_speed.py                      # the bundled fmnist-ddpm
    python benchmarks/bias_correction_speed.py --model cifar10      # the DDPM CIFAR-10 UNet (random weights)

tests/test_graph_bias_correction.py runs the same definition against the walk on a tiny UNet.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from qtoolkit.graph import calibrate, capture, copy_graph, freeze, quant_ops, quantize
from qtoolkit.graph.bias_correction import correct_bias
from qtoolkit.graph.node_values import for_each_batch, random_subset
from qtoolkit.graph.patterns import CONV, LINEAR
from qtoolkit.models import load_diffusion_model
from qtoolkit.quant import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_speed import CIFAR10_DDPM, calibration_inputs  # noqa: E402


def correct_bias_op_by_op(qgraph, fp_graph, inputs, samples, seed=0) -> None:
    """The definition of bias correction, one partial pass of the quantized graph per op; in place."""
    outputs = {op.node: f"{name}.output" for name, op in quant_ops(qgraph).items() if op.output is not None}
    ops = []
    for node in qgraph.graph.nodes:
        if node.op == "call_function" and node.target in (CONV, LINEAR) and len(node.args) > 2:
            source = node.args[2]
            while source is not None and source.op == "call_module":  # the bias quantizer
                source = source.args[0]
            if source is not None and source.op == "get_attr":
                output = next((u.name for u in node.users if u.op == "call_module"
                               and u.target == outputs.get(node.name)), node.name)
                ops.append((node.name, output, qgraph.get_parameter(source.target), 1 if node.target == CONV else -1))
    inputs = random_subset(inputs, samples, torch.Generator().manual_seed(seed))

    def channel_mean(graph, name, dim):
        parts = []  # per batch, as qtoolkit's _ChannelMeans: float64 sums batch by batch
        for_each_batch(graph, inputs, [name], lambda _, v: parts.append(v.movedim(dim, -1).reshape(-1, v.shape[dim])))
        return sum(part.double().sum(0) for part in parts) / sum(len(part) for part in parts)

    for node, output, bias, dim in ops:
        error = channel_mean(fp_graph, node, dim) - channel_mean(qgraph, output, dim)
        with torch.no_grad():
            bias.add_(error.to(bias.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-ddpm", help="a model qtoolkit loads, or cifar10 (random weights)")
    parser.add_argument("--samples", type=int, default=256, help="bias correction's inputs (the recipes' default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "cifar10":
        from diffusers import UNet2DModel

        from qtoolkit.models import DiffusionModel
        from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG

        model = DiffusionModel(UNet2DModel(**CIFAR10_DDPM).eval(), dict(DEFAULT_SCHEDULER_CONFIG), Path("cifar10"))
    else:
        model = load_diffusion_model(args.model)
    inputs = calibration_inputs(model.sample_shape, args.samples, seed=0)
    fp = capture(model.denoiser(), model.sample_shape)
    qgraph = quantize(fp, QuantConfig(quantize_conv_outputs=True))
    with calibrate(qgraph), torch.no_grad():
        for start in range(0, len(inputs), 64):
            qgraph(inputs.x[start:start + 64], inputs.t[start:start + 64])
    freeze(qgraph)
    ops = sum(1 for node in qgraph.graph.nodes if node.op == "call_function" and node.target in (CONV, LINEAR))
    walk = functools.partial(correct_bias, progress=False)
    rows, results = [], {}
    for name, run in (("op by op (the definition)", correct_bias_op_by_op), ("one walk (qtoolkit)", walk)):
        graph = copy_graph(qgraph)
        start = time.perf_counter()
        run(graph, fp, (inputs.x, inputs.t), samples=args.samples)
        rows.append((name, time.perf_counter() - start))
        results[name] = {k: v for k, v in graph.state_dict().items() if k.endswith(".bias")}
    same = all(torch.equal(v, results["one walk (qtoolkit)"][k]) for k, v in results["op by op (the definition)"].items())
    print(f"bias correction of {args.model} (W8A8, quantized conv outputs; {ops} conv/linear ops), "
          f"{args.samples} inputs, {args.threads} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| implementation | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nspeed-up {rows[0][1] / rows[1][1]:.1f}x; biases bit-identical: {same}")


if __name__ == "__main__":
    main()
