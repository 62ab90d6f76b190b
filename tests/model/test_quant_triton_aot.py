"""The Triton W8A16/W4A16 kernels compiled ahead of time, as the 6B layers launch them, for sm_90 and sm_80.

No GPU is needed: `triton.compile` takes a GPUTarget and Triton bundles ptxas. Every kernel `choose_config` leads
to for the four linear shapes at 1..128 rows (132 SMs on sm_90 H100/H200, 108 on sm_80 A100) must compile with no
register spills, within the target's shared memory per block, and with its loads pipelined (`cp.async` in the PTX,
wherever num_stages >= 2): a config that fails one of these runs slowly, or not at all, on the first GPU it meets.

Each kernel is specialized the way the JIT specializes a launch (Triton 3.6's own binder and _pack_args on the real
argument values, tensors as 16-byte aligned mocks, as torch's allocations are), so M == 1 is a constant and
pointers, sizes and strides divisible by 16 are known to be. Without those facts the kernel is a different, much
worse one (the decode configs: 255 registers, 184-312 B spilled, byte-wide weight loads, no cp.async), not the
one a launch compiles. The compiles run in a child process without TRITON_INTERPRET, which tests/conftest.py turns
on before anything imports triton (triton reads it at import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}  # (N, K)
TARGETS = {90: 132, 80: 108}  # compute capability -> SMs of the GPU choose_config is asked about
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (227 KiB, 163 KiB)
ROWS = range(1, 129)


def kernel_variants(capability: int) -> dict[str, dict]:
    """The distinct compiles behind every (rows, layer, bits, dtype) launch on this target, keyed by their
    specialization; each says which launches use it (in the child: imports triton)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    from serve_app.model import quant_triton

    backend = make_backend(GPUTarget("cuda", capability, 32))
    variants: dict[str, dict] = {}
    for bits, kernel in ((8, quant_triton._w8a16_kernel), (4, quant_triton._w4a16_kernel)):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for dtype in (torch.float16, torch.bfloat16):
            for layer, (n, k) in SHAPES.items():
                for m in ROWS:
                    config = quant_triton.choose_config(m, n, k, bits, TARGETS[capability])
                    out_dtype = dtype if config.split_k == 1 else torch.float32
                    # The arguments of weight_only_matmul's launch, tensors replaced by aligned mocks.
                    args = (MockTensor(dtype), MockTensor(torch.int8), MockTensor(torch.float16), MockTensor(out_dtype),
                            m, n, k, k, k if bits == 8 else k // 2, m * n, n)
                    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                SPLIT_K=config.split_k, K_STEPS=triton.cdiv(k, config.block_k * config.split_k),
                                DOT_FP32=False, num_warps=config.num_warps, num_stages=config.num_stages)
                    bound, specialization, options = binder(*args, **meta)
                    _, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
                    # M divisible by 16 only simplifies the row masks: such launches are compiled as any M, which
                    # took at least as many registers for every config here, in about half the time.
                    attrs.pop((kernel.arg_names.index("M"),), None)
                    key = repr((bits, signature, sorted(constexprs.items()), sorted(attrs.items()), config))
                    variant = variants.setdefault(key, dict(
                        bits=bits, dtype=str(dtype).removeprefix("torch."), config=vars(config),
                        k_steps=meta["K_STEPS"], m_spec="1" if m == 1 else "any",
                        capability=capability, launches=[], compile=(signature, constexprs, attrs)))
                    variant["launches"].append((layer, m))
    return variants


def compile_variant(variant: dict) -> dict:
    """Compile one variant for its target and read what ptxas reports for it (in the child)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    from serve_app.model import quant_triton

    capability, config = variant["capability"], variant["config"]
    kernel = quant_triton._w8a16_kernel if variant["bits"] == 8 else quant_triton._w4a16_kernel
    signature, constexprs, attrs = variant.pop("compile")
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                        attrs=attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))
    ptx = compiled.asm["ptx"]
    # CompiledKernel.n_regs / n_spills come from loading the cubin on a device: ask ptxas instead.
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              source.name, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    return dict(variant, regs=int(re.search(r"Used (\d+) registers", log).group(1)),
                spills=sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
                shared=compiled.metadata.shared,
                cp_async=sorted(set(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx))))


def _child() -> None:
    """Print the compile report of every variant on both targets as JSON lines."""
    variants = [v for capability in TARGETS for v in kernel_variants(capability).values()]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for result in pool.map(compile_variant, variants):
            print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def _name(report: dict) -> str:
    c = report["config"]
    return (f"sm_{report['capability']} int{report['bits']} {report['dtype']} M={report['m_spec']} "
            f"{c['block_m']}x{c['block_n']}x{c['block_k']} split {c['split_k']} K_STEPS {report['k_steps']} "
            f"warps {c['num_warps']} stages {c['num_stages']} (e.g. {report['launches'][0]})")


@pytest.mark.slow
def test_every_kernel_the_6b_layers_launch_compiles_without_spills_within_shared_memory(reports):
    assert {r["capability"] for r in reports} == set(TARGETS)
    assert sum(len(r["launches"]) for r in reports) == len(TARGETS) * 2 * 2 * len(SHAPES) * len(ROWS)
    bad = [f"{_name(r)}: {r['regs']} registers, {r['spills']} B spilled, {r['shared']} B shared"
           for r in reports if r["spills"] or r["shared"] > SMEM_LIMIT[r["capability"]]]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_kernel_loads_are_pipelined(reports):
    # Decode (rows <= 16) streams the weights: unpipelined loads leave the SM waiting on each tile.
    bad = [_name(r) for r in reports if r["config"]["num_stages"] >= 2 and not r["cp_async"]]
    assert not bad, "no cp.async in:\n" + "\n".join(bad)
    assert any(min(m for _, m in r["launches"]) <= 16 for r in reports)


if __name__ == "__main__":
    _child()
