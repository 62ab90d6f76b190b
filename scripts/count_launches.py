"""Ops and kernel launches per decode step, per decode path and batch size (serve_app/bench/launches.py).

    PYTHONPATH=. python scripts/count_launches.py --preset tiny --rows 1,8                 # CPU, eager slot views
    PYTHONPATH=. python scripts/count_launches.py --preset tiny --rows 1,8 --attention flex --paths eager,graphs
    python scripts/count_launches.py --preset 6b --rows 1,64 --device cuda --dtype fp16 --compile-decode \\
        --json launches.json                                                                # the GPU check

Random weights of the preset (serve_app.model.demo: the counts do not depend on them), one runner per path over
the same model, each step at position --context of every row's slot. Paths: `eager` (no graphs; attention as
--attention says, auto = flex compiled on CUDA, slot views on CPU), `graphs` (decode graphs on the flex backend; on
CPU the capture re-runs the step, so the counts are those of the function a graph records) and `compiled` (graphs
of the compiled step; --compile-decode adds it). Default paths: eager,graphs on CUDA, eager on CPU. Prints a
markdown table; --json writes every count.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root holds serve_app
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PATHS = ("eager", "graphs", "compiled")


def make_runner(loaded, path: str, num_slots: int, max_seq_len: int, attention: str, compile_backend: str,
                compile_flex: bool | None):
    from serve_app.engine.runner import ModelRunner

    cuda = loaded.device.type == "cuda"
    graphs = path != "eager"
    if graphs and attention == "auto":
        attention = "flex"  # decode graphs need it
    options = dict(attention=attention, graphs=graphs, compile_decode=path == "compiled",
                   compile_backend=compile_backend, compile_flex=compile_flex)
    if graphs and not cuda:
        options["capture"] = lambda fn: fn  # no CUDA graphs here: the "graph" re-runs the function it records
    return ModelRunner(loaded, num_slots, max_seq_len, **options)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="serve_app.model.demo preset: tiny, small, 6b")
    parser.add_argument("--rows", default="1,8", help="decode rows per step, comma-separated")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="precision: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16, "
                        "fp16, int8, int4")
    parser.add_argument("--attention", default="auto", help="auto, slot-view, flex or gather (graph paths: flex)")
    parser.add_argument("--paths", default=None, help=f"comma-separated, of {', '.join(PATHS)}; default: "
                        "eager,graphs on CUDA, eager on CPU (+ compiled with --compile-decode)")
    parser.add_argument("--compile-decode", action="store_true", help="also count the compiled step's graphs")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (CPU tests: aot_eager)")
    parser.add_argument("--compile-flex", action=argparse.BooleanOptionalAction, default=None,
                        help="compile flex_attention (default: on CUDA)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--context", type=int, default=64, help="position of every row's decode token")
    parser.add_argument("--sampled", action="store_true", help="temperature + top_p sampling instead of greedy")
    parser.add_argument("--no-pack-cpu-linears", action="store_true", help="plain F.linear on CPU (as on a GPU)")
    parser.add_argument("--top", type=int, default=10, help="top-N op names per step")
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Count, print the table, write --json; returns what --json holds."""
    args = parse_args(argv)
    from serve_app.bench.launches import count_step, markdown_table, random_model

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    if not rows or min(rows) < 1:
        raise SystemExit("--rows needs positive row counts")
    loaded = random_model(args.preset, args.dtype, args.device, layers=args.layers,
                          pack_cpu_linears=not args.no_pack_cpu_linears)
    cuda = loaded.device.type == "cuda"
    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    else:
        paths = ["eager", "graphs"] if cuda else ["eager"]
    if args.compile_decode and "compiled" not in paths:
        paths.append("compiled")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    counts = []
    for path in paths:
        runner = make_runner(loaded, path, max(rows), args.context + 8, args.attention, args.compile_backend,
                             args.compile_flex)
        for r in rows:
            counts.append(count_step(runner, r, context=args.context, sampled=args.sampled, top=args.top))
        del runner
    print(f"{args.preset} preset ({loaded.config.num_layers} layers), {loaded.precision} on {loaded.device}, "
          f"torch {torch.__version__}: one decode step at position {args.context}\n")
    print(markdown_table(counts))
    report = {
        "preset": args.preset, "num_layers": loaded.config.num_layers, "precision": loaded.precision,
        "device": str(loaded.device), "context": args.context, "sampled": args.sampled, "torch": torch.__version__,
        "paths": paths, "rows": rows, "results": [c.to_dict() for c in counts],
    }
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(loaded.device)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
