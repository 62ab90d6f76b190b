"""scripts/gpu_check.sh runs here the way the GPU machine runs it, on CPU with the tiny preset, with the packages that
machine lacks made unimportable: every section must finish and write its results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from serve_app.bench.gpu_check import SECTIONS

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
    assert list(results) == list(SECTIONS)
    assert {name: section["status"] for name, section in results.items()} == dict.fromkeys(SECTIONS, "ok")
    assert results["device_check"]["fp32"]["passed"]
    assert results["decode_fp16"]["batch_1"]["nonfinite_ids"] == 0
    for precision in ("int8", "int4"):
        assert results["decode_quant"][f"{precision}_device_check"]["passed"]
        assert results["decode_quant"][f"{precision}_path"].endswith(("int8pack_mm", "int4pack_mm_cpu"))
    assert results["throughput"]["greedy_c4"]["output_tokens_per_s"] > 0
    assert results["throughput"]["concurrent_vs_alone_identical"]["identical"] == 8  # CPU: batch-invariant here
    assert all(isinstance(v["batch_1_step_ms"], float) for v in results["attention"].values() if isinstance(v, dict))
    assert results["launches"]["eager_rows_1"]["ops"] > 0
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## throughput (ok)" in markdown and "| fp32 | 1 |" in markdown


def _report(tmp_path):
    from serve_app.bench.gpu_check import CPU_PLAN, Budget, Report, run_section

    return CPU_PLAN, Budget, Report(tmp_path), run_section


def test_a_failing_section_keeps_what_it_measured_and_the_next_one_runs(tmp_path):
    plan, Budget, report, run_section = _report(tmp_path)

    def breaks_halfway(plan, out):
        out.put("batch_1", {"step_ms": 1.5})
        out.line("| fp16 | 1 | 1.5 |")
        raise RuntimeError("device-side assert")

    assert run_section(report, "decode_fp16", breaks_halfway, plan, Budget(60)) == "failed"
    assert run_section(report, "launches", lambda plan, out: out.put("ops", 3), plan, Budget(60)) == "ok"
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["decode_fp16"]["batch_1"] == {"step_ms": 1.5}
    assert on_disk["decode_fp16"]["status"] == "failed" and "device-side assert" in on_disk["decode_fp16"]["error"]
    assert on_disk["launches"] == on_disk["launches"] | {"status": "ok", "ops": 3}
    assert "| fp16 | 1 | 1.5 |" in (tmp_path / "gpu_check.md").read_text()


def test_a_section_that_no_longer_fits_the_budget_is_skipped_not_started(tmp_path):
    plan, Budget, report, run_section = _report(tmp_path)
    started = []
    assert run_section(report, "smoke", lambda plan, out: started.append(1), plan, Budget(0)) == "skipped"
    assert not started
    assert json.loads((tmp_path / "gpu_check.json").read_text())["smoke"]["status"] == "skipped"


def test_sigterm_writes_the_running_sections_figures_and_exits_124(tmp_path):
    """The check killed mid-section by its timeout: what that section had measured is on disk, marked interrupted."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OUT": str(tmp_path)}
    script = (
        "import time, sys\n"
        "from serve_app.bench import gpu_check\n"
        "def slow(plan, out):\n"
        "    out.put('batch_1', {'step_ms': 2.0})\n"
        "    print('measured', flush=True)\n"
        "    time.sleep(60)\n"
        "gpu_check.SECTION_FNS['smoke'] = slow\n"
        "sys.exit(gpu_check.main(['--tiny-cpu', '--sections', 'environment,smoke,decode_fp16']))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("measured"):
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 124
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["environment"]["status"] == "ok"
    assert results["smoke"]["status"] == "interrupted" and results["smoke"]["batch_1"] == {"step_ms": 2.0}
    assert "decode_fp16" not in results  # nothing starts after the signal


def test_the_blocker_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    run = subprocess.run([sys.executable, "-c", "import pydantic"], env=os.environ | {"PYTHONPATH": str(tmp_path)},
                         check=False,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "not installed on the GPU machine" in run.stderr
