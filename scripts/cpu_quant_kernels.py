"""INT8 against INT4 CPU kernels on the 6B block shapes, side by side: `python scripts/cpu_quant_kernels.py`.

Builds --blocks transformer blocks' worth of the four quantized linears (qkv, dense, h_to_4h, 4h_to_h) for each
candidate, so each candidate's weights exceed the L3 cache as in the real model, then times one pass over all of
them per candidate, alternating candidates every repetition so that a shared machine's load hits them alike.
Prints the median ms per block, the weight bytes read per second and the weights (elements) per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from serve_app.model.quant import QuantizedLinear, pack_int4, quantize_rows

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}


def build(bits: int, blocks: int, kernel: str) -> list[QuantizedLinear]:
    layers = []
    for block in range(blocks):
        for name, shape in SHAPES.items():
            generator = torch.Generator().manual_seed(block * 10 + len(name))
            q, scale = quantize_rows((torch.randn(shape, generator=generator) * 0.02).half(), bits)
            layers.append(QuantizedLinear.from_official(pack_int4(q) if bits == 4 else q, scale, bits,
                                                        dtype=torch.bfloat16, device="cpu", kernel=kernel))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = {f"int{bits} {kernel}": build(bits, args.blocks, kernel) for bits, kernel in ((8, "native"),
                                                                                              (4, "native"))}
    elements = args.blocks * sum(out * inp for out, inp in SHAPES.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.blocks} blocks "
          f"({elements / 1e9:.2f} G weights per pass)")
    print("| batch | candidate | kernel | ms per block | weight GB/s | G weights/s |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",")]:
        x = {inp: torch.randn(batch, inp).bfloat16() for _, inp in SHAPES.values()}
        timings = {name: [] for name in candidates}
        for rep in range(args.reps + 1):
            for name, layers in candidates.items():
                start = time.perf_counter()
                for layer in layers:
                    layer(x[layer.in_features])
                if rep:  # the first pass warms up
                    timings[name].append(time.perf_counter() - start)
        for name, times in timings.items():
            seconds = statistics.median(times)
            layers = candidates[name]
            read = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
            print(f"| {batch} | {name} | {layers[0].kernel_name} | {seconds / args.blocks * 1e3:.1f} | "
                  f"{read / seconds / 1e9:.1f} | {elements / seconds / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
