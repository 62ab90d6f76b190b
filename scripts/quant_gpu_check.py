"""Quantized matmul kernels against fp16 on one GPU, on the 6B layer shapes: `python scripts/quant_gpu_check.py`.

For each batch size, the time of one decode step's four block linears (qkv, dense, h_to_4h, 4h_to_h) with fp16
weights (F.linear, cuBLAS) and with every int8/int4 kernel QuantizedLinear offers on CUDA, each checked against
the dequantize reference first. Prints a table: microseconds per layer set, speed-up over fp16, and the share of
the HBM roofline for the bytes each reads (weights only), given --bandwidth-gbs (H100 SXM 3350, H200 4800).
Written without a GPU to run it on: its numbers are the first GPU measurement of these kernels.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from serve_app.model.quant import KernelUnavailable, QuantizedLinear, pack_int4, quantize_rows

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}
CANDIDATES = [(8, "triton", torch.float16), (4, "triton", torch.float16), (8, "native", torch.float16),
              (4, "native", torch.bfloat16)]


def time_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0)
    args = parser.parse_args()
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
    print("| batch | kernel | us per layer set | x fp16 | % of HBM roofline |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",")]:
        xs = {name: torch.randn(batch, shape[1], device="cuda", dtype=torch.float16) for name, shape in SHAPES.items()}
        base = time_us(lambda: [F.linear(xs[n], weights[n]) for n in SHAPES])
        for label, built in layers.items():
            if built is None:
                us, read = base, fp16_bytes
            else:
                dtype = next(iter(built.values())).dtype
                xk = {n: x.to(dtype) for n, x in xs.items()}
                us = time_us(lambda: [built[n](xk[n]) for n in SHAPES])
                read = sum(m.weight.numel() * m.weight.element_size() for m in built.values())
            roofline = read / (args.bandwidth_gbs * 1e3) / us * 100  # bytes / (bytes per us) / us
            print(f"| {batch} | {label} | {us:.1f} | {base / us:.2f} | {roofline:.0f} |", flush=True)


if __name__ == "__main__":
    main()
