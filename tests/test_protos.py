"""The committed gRPC code is what scripts/gen_protos.sh makes from serve_app/protos/chatglm2.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["chatglm2_pb2.py", "chatglm2_pb2_grpc.py"]


def test_regenerating_gives_the_committed_files(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "serve_app" / "protos" / name).read_text()
        assert fresh == (ROOT / "serve_app" / "protos" / name).read_text(), f"{name} is stale: run scripts/gen_protos.sh"


def test_messages_belong_to_the_package_module():
    # Serve's gRPC proxy pickles requests to the replicas: the class must be importable by this name.
    from serve_app.protos import chatglm2_pb2

    assert chatglm2_pb2.GenerateRequest.__module__ == "serve_app.protos.chatglm2_pb2"
    assert chatglm2_pb2.DESCRIPTOR.services_by_name["ChatGLM2"].full_name == "chatglm2.ChatGLM2"
