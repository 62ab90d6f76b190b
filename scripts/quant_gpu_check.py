"""Quantized matmul kernels against fp16 on one GPU, on the 6B layer shapes: `python scripts/quant_gpu_check.py`.

For each batch size, the time of one decode step's four block linears (qkv, dense, h_to_4h, 4h_to_h) with fp16
weights (F.linear, cuBLAS) and with every int8/int4 kernel QuantizedLinear offers on CUDA, each checked against
the dequantize reference first. Prints a table: microseconds per layer set, speed-up over fp16, and the share of
the HBM roofline for the bytes each reads (weights only), at the bandwidth of the device's name
(serve_app.bench.engine_bench's table) or --bandwidth-gbs. Each layer set is timed as a CUDA graph replay, because at
small batches eager dispatch (30-50 us a set) costs more than the kernels (4-25 us each at one row) and would be
all the table measured. Written without a GPU to run it on: its numbers are the first GPU measurement of these
kernels.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from serve_app.bench.engine_bench import device_bandwidth
from serve_app.model.quant import KernelUnavailable, QuantizedLinear, pack_int4, quantize_rows

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}
CANDIDATES = [(8, "triton", torch.float16), (4, "triton", torch.float16), (8, "native", torch.float16),
              (4, "native", torch.bfloat16)]


def time_us(fn, label: str, reps: int = 100) -> tuple[float, str]:
    """(GPU microseconds per call of fn, how it was timed). fn is captured into a CUDA graph and the replays timed
    between events, so the figure is the kernels' own. If capture fails, eager calls are timed instead ("eager":
    host dispatch included), and a loud line says so."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # Triton's compiles and cuBLAS's first calls, outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, how = graph.replay, "graph"
    except RuntimeError as exc:
        print(f"!!! {label}: CUDA graph capture failed, timing EAGER calls (host dispatch included): {exc}", flush=True)
        torch.cuda.synchronize()
        run, how = fn, "eager"
    run()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="peak HBM GB/s for the roofline column (default: from the device's name)")
    args = parser.parse_args()
    bandwidth = device_bandwidth(torch.device("cuda"), args.bandwidth_gbs)  # bytes/s, None for an unknown GPU
    print(f"{torch.cuda.get_device_name()}: roofline at "
          + (f"{bandwidth / 1e9:.0f} GB/s" if bandwidth else "an unknown bandwidth (pass --bandwidth-gbs)"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator, device="cuda", dtype=torch.float16) * 0.02
               for name, shape in SHAPES.items()}
    layers = {"fp16": None}
    for bits, family, dtype in CANDIDATES:
        built = {}
        try:
            for name, weight in weights.items():
                q, scale = quantize_rows(weight, bits)
                built[name] = QuantizedLinear.from_official(pack_int4(q) if bits == 4 else q, scale, bits,
                                                            dtype=dtype, device="cuda", kernel=family)
        except KernelUnavailable as exc:
            print(f"int{bits} {family}: {exc}")
            continue
        layers[f"int{bits} {next(iter(built.values())).kernel_name}"] = built
    fp16_bytes = sum(w.numel() * 2 for w in weights.values())
    print("| batch | kernel | us per layer set | timed as | x fp16 | % of HBM roofline |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",")]:
        xs = {name: torch.randn(batch, shape[1], device="cuda", dtype=torch.float16) for name, shape in SHAPES.items()}
        base, base_how = time_us(lambda: [F.linear(xs[n], weights[n]) for n in SHAPES], f"batch {batch} fp16")
        for label, built in layers.items():
            if built is None:
                us, how, read = base, base_how, fp16_bytes
            else:
                dtype = next(iter(built.values())).dtype
                xk = {n: x.to(dtype) for n, x in xs.items()}
                us, how = time_us(lambda: [built[n](xk[n]) for n in SHAPES], f"batch {batch} {label}")
                read = sum(m.weight.numel() * m.weight.element_size() for m in built.values())
            roofline = f"{read / bandwidth / (us * 1e-6) * 100:.0f}" if bandwidth else "-"
            print(f"| {batch} | {label} | {us:.1f} | {how} | {base / us:.2f} | {roofline} |", flush=True)


if __name__ == "__main__":
    main()
