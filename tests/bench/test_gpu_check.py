"""scripts/gpu_check.sh runs here the way the GPU machine runs it, on CPU with the tiny preset, with the packages that
machine lacks made unimportable: every section must finish and write its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "pydantic", "fastapi", "starlette", "uvicorn", "httpx", "grpc", "sentencepiece",
                             "transformers", "safetensors", "prometheus_client")

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_MACHINE!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, Block())
"""


def test_gpu_check_runs_on_cpu_without_the_serving_stack(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}",
                        "OUT": str(tmp_path / "out")}
    run = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--tiny-cpu"], env=env, capture_output=True, check=False,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(results) == ["environment", "correctness", "decode", "throughput", "attention"]
    assert not [name for name, section in results.items() if "error" in section]
    assert results["correctness"]["engine_concurrent_vs_alone"]["greedy"]["identical_sequences"] == 8
    assert set(results["decode"]["precisions"]) == {"fp32", "int8", "int4"}
    assert "## throughput" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(isinstance(ms, float) for ms in results["attention"]["step_ms"].values())


def test_the_blocker_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    run = subprocess.run([sys.executable, "-c", "import pydantic"], env=os.environ | {"PYTHONPATH": str(tmp_path)},
                         check=False,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "not installed on the GPU machine" in run.stderr
