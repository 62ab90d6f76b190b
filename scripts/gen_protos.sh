#!/usr/bin/env bash
# Regenerates serve_app/api/protos/chatglm2_pb2.py and chatglm2_pb2_grpc.py from chatglm2.proto (both are committed;
# tests/api/test_protos.py checks they match). Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root)
# The proto is compiled by its path from the repository root, so the generated modules call themselves
# serve_app.api.protos.chatglm2_pb2 (messages pickle between Serve's gRPC proxy and replicas) and the _grpc module
# imports `from serve_app.api.protos import chatglm2_pb2`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
out="${1:-$root}"
cd "$root"
"$python" -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" serve_app/api/protos/chatglm2.proto
