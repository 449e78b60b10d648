"""Where an OpenVINO model spends its time: per-node-type totals from OpenVINO's own profiler (PERF_COUNT).

Reads exported graphs (ONNX, or OpenVINO IR as NNCF writes it) and prints, for each, the milliseconds per
forward by (node type, kernel), summed over the nodes that ran, averaged over a few forwards. The kernel
name carries the precision OpenVINO chose (e.g. brgconv_avx512_amx_I8 for a u8 convolution, jit_avx512_bf16
for a bf16 elementwise node). The benchmark's work folder holds the graphs to compare:

    python benchmarks/int8_speed.py --work runs/int8-speed-work ...
    python benchmarks/openvino_profile.py --batch 16 --float-precision bf16 \\
        runs/int8-speed-work/int8/model.onnx runs/int8-speed-work/openvino-int8-nncf/model.xml
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from qtoolkit_plugins.openvino_backend import _HINTS, engine_config, read_for_batch
from qtoolkit.optional import import_optional
from qtoolkit.export.onnx_graph import INPUT_NAMES


def profile(model_file: Path, batch: int, float_precision: str, threads: int, runs: int) -> dict:
    """(node type, kernel) -> [ms per forward, nodes] for one model."""
    ov = import_optional("openvino", "the OpenVINO profile")
    # Compiled as qtoolkit's engine compiles it (for one static batch size), with the profiler on.
    config = {**engine_config(float_precision, threads), "PERF_COUNT": True}
    core = ov.Core()
    compiled = core.compile_model(read_for_batch(core, model_file, batch), "CPU", config)
    shape = list(compiled.input(INPUT_NAMES[0]).get_shape())
    rng = np.random.default_rng(0)
    feed = {INPUT_NAMES[0]: rng.standard_normal(shape, dtype=np.float32),
            INPUT_NAMES[1]: rng.integers(0, 1000, batch)}
    request = compiled.create_infer_request()
    for _ in range(3):  # warm-up
        request.infer(feed)
    totals: dict = defaultdict(lambda: [0.0, 0])
    for _ in range(runs):
        request.infer(feed)
        for node in request.profiling_info:
            if node.status.name == "EXECUTED":
                entry = totals[(node.node_type, node.exec_type)]
                entry[0] += node.real_time.total_seconds() * 1e3 / runs
                entry[1] += 1
    return {key: (ms, count // runs) for key, (ms, count) in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--float-precision", choices=sorted(_HINTS), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=14, help="rows per model")
    args = parser.parse_args(argv)
    for model_file in args.models:
        rows = profile(model_file, args.batch, args.float_precision, args.threads, args.runs)
        print(f"\n{model_file}: {sum(ms for ms, _ in rows.values()):.1f} ms of node time per forward")
        print("| node type | kernel | ms | nodes |\n|---|---|---|---|")
        for (node_type, kernel), (ms, count) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"| {node_type} | {kernel} | {ms:.1f} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
