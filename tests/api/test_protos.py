"""The committed gRPC code is what scripts/gen_protos.sh makes from serve_app/api/protos/chatglm2.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["chatglm2_pb2.py", "chatglm2_pb2_grpc.py"]


def test_regenerating_gives_the_committed_files(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "serve_app" / "api" / "protos" / name).read_text()
        assert fresh == (ROOT / "serve_app" / "api" / "protos" / name).read_text(), f"{name} is stale: run scripts/gen_protos.sh"


def test_messages_belong_to_the_package_module():
    # Serve's gRPC proxy pickles requests to the replicas: the class must be importable by this name.
    from serve_app.api.protos import chatglm2_pb2

    assert chatglm2_pb2.GenerateRequest.__module__ == "serve_app.api.protos.chatglm2_pb2"
    assert chatglm2_pb2.DESCRIPTOR.services_by_name["ChatGLM2"].full_name == "chatglm2.ChatGLM2"


def test_configs_name_a_servicer_function_that_keeps_the_proxy_light():
    """Every Serve proxy imports the configs' grpc_servicer_functions: they must import, and without torch or the
    app (the first version pulled in torch through the ingress module: +175 MB in every proxy process)."""
    import yaml

    functions = {entry for config in ("local.yaml", "gpu.yaml")
                 for entry in yaml.safe_load((ROOT / "configs" / config).read_text())["grpc_options"][
                     "grpc_servicer_functions"]}
    assert functions == {"serve_app.api.grpc_servicer.add_servicer_to_server"}
    probe = ("import importlib, sys\n"
             "for path in sys.argv[1:]:\n"
             "    module, _, name = path.rpartition('.')\n"
             "    assert callable(getattr(importlib.import_module(module), name))\n"
             "print(sorted(m for m in ('torch', 'ray', 'pydantic', 'serve_app.api.schemas') if m in sys.modules))\n")
    loaded = subprocess.run([sys.executable, "-c", probe, *functions], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.strip()
    assert loaded == "[]"
