"""Peak memory of each backend, measured alone in a fresh process (the benchmark's memory column).

One process holds every backend while the benchmark times them, so its memory says nothing about any one of
them; and engines keep their buffers between calls (OpenVINO and oneDNN allocate at the first inference),
so the growth during a call is no measure either. Instead, for each backend, a child process imports the
same libraries, notes its resident memory (the baseline), rebuilds the backend from the benchmark's
BackendSources, and for each batch size (ascending) runs one warm-up forward (graph compilation and
first-call allocations), resets the kernel's high-water mark of resident memory, and runs one more. The
figure is that high-water mark minus the baseline: what serving the model at that batch size holds at its
peak, weights, engine buffers and activations together, as `ps` or a container limit would see it.

Before anything else the probe holds glibc's mmap threshold at its default starting value (128 KiB), so that
every buffer from there up is mapped when allocated and unmapped when freed. Left to adapt, as it does by
default, glibc raises the threshold to the largest buffer freed so far (up to 32 MiB), after which such
buffers come from the heap, and what a freed one leaves resident depends on the order of earlier frees: the
same forward of FP32 eager at batch 64 on the CIFAR-10 architecture peaked anywhere from 694 to 987 MiB from
one fresh process to the next. With the threshold held, three processes agree within 1% (647 MiB), and the
figure is the memory the backend holds rather than what the allocator happened to keep. The benchmark still
runs each probe several times and reports the median.

Linux only (/proc/self/status and /proc/self/clear_refs); elsewhere the column is left out.

    python -m qtoolkit.engines.memory --work WORK --backend openvino-int8 --batch-sizes 1 16 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from ..errors import QtoolkitError

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESULT_PREFIX = "qtoolkit-memory: "
M_MMAP_THRESHOLD = -3  # glibc's malloc.h; setting it also stops the threshold from adapting
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def supported() -> bool:
    return STATUS.is_file() and CLEAR_REFS.exists()


def _status_mib(field: str) -> float:
    kib = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(kib.group(1)) / 1024


def _hold_mmap_threshold() -> bool:
    """Hold glibc's mmap threshold fixed (the module docstring says why); False where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def _reset_peak() -> None:
    CLEAR_REFS.write_text("5")  # "5" resets the peak resident set size (VmHWM) to the current one


def probe(work: Path, backend: str, batch_sizes: list[int], threads: int, seed: int) -> dict[int, float]:
    """In this process: peak resident MiB above the baseline while `backend` serves each batch size."""
    _hold_mmap_threshold()
    import torch

    from ..backend_lookup import engine_names, resolve_backend
    from .backends import build_backend
    from .sources import BackendSources

    # Every probe imports the same libraries before its baseline, whichever backend it builds: asking each
    # runnable engine for its runtime's version imports that runtime.
    for name in engine_names():
        if resolve_backend(name).float_precisions():
            resolve_backend(name).runtime_version()
    # So does torch's compiler, the runtime of the rows that compile (the PT2E peer, torch.compile): 116 MiB of
    # Python modules on import, on the CIFAR-10 architecture more than the int8 weights.
    import torch._inductor.compile_fx  # noqa: F401
    torch.set_num_threads(threads)
    sources = BackendSources.reopen(work, threads)
    baseline = _status_mib("VmRSS")
    backend = build_backend(backend, sources)
    generator = torch.Generator().manual_seed(seed)
    peaks = {}
    with torch.no_grad():
        for batch in sorted(batch_sizes):
            x = torch.randn(batch, *sources.sample_shape, generator=generator)
            t = torch.randint(0, 1000, (1,), generator=generator).repeat(batch)  # one timestep, as a sampler sends
            backend.eps(x, t)
            _reset_peak()
            backend.eps(x, t)
            peaks[batch] = _status_mib("VmHWM") - baseline
    return peaks


def measure(work: Path, backends: list[str], batch_sizes: list[int], threads: int, seed: int,
            progress=None, repeats: int = 1) -> dict[tuple[str, int], float]:
    """Peak MiB of each backend at each batch size, each backend in its own child process: the median of
    `repeats` such processes."""
    samples: dict[tuple[str, int], list[float]] = {}
    for name in backends:
        for _ in range(repeats):
            for key, mib in _probe_in_child(work, name, batch_sizes, threads, seed).items():
                samples.setdefault(key, []).append(mib)
            if progress is not None:
                progress.advance()
    return {key: statistics.median(values) for key, values in samples.items()}


def _probe_in_child(work: Path, name: str, batch_sizes: list[int], threads: int,
                    seed: int) -> dict[tuple[str, int], float]:
    command = [sys.executable, "-m", __name__, "--work", str(work), "--backend", name, "--threads", str(threads),
               "--seed", str(seed), "--batch-sizes", *map(str, batch_sizes)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QtoolkitError(f"the memory probe of {name} failed (exit {done.returncode}): {reason}; pass "
                            "--no-memory to time the backends without it")
    return {(name, int(batch)): mib for batch, mib in json.loads(lines[-1][len(RESULT_PREFIX):]).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a benchmark's work folder (BackendSources)")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not supported():
        print("the memory probe needs Linux's /proc/self/status and /proc/self/clear_refs", file=sys.stderr)
        return 2
    try:
        peaks = probe(args.work, args.backend, args.batch_sizes, args.threads, args.seed)
    except QtoolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(peaks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
