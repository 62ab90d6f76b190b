# The serving image: Ray 2.60.0 (Python 3.11, CUDA) with torch and this package; KubeRay runs it on every Ray pod.
#   docker build -t chatglm2-serve:0.1.0 .
# The Ray version in the tag must equal rayVersion in k8s/ray-service.gpu.yaml (RAY_VERSION in serve_app/deploy/k8s.py).
FROM rayproject/ray:2.60.0-py311-gpu

# rayproject/ray has Ray and the CUDA libraries but no torch. PyPI's Linux x86_64 torch wheels bundle their own CUDA
# runtime, so the node only needs an NVIDIA driver recent enough for that CUDA; for an older driver install torch
# from the PyTorch wheel index of a matching CUDA (pip's --index-url) instead.
ARG TORCH_VERSION=2.13.0

# The base image's user (ray, uid 1000, group users) owns the conda environment and runs Ray: stay non-root.
USER ray
WORKDIR /home/ray/chatglm2-serve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
# Ray is pinned to the image's own version so that pip never swaps it for another release.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir . "ray[serve]==2.60.0" \
    && rm -rf /home/ray/chatglm2-serve
WORKDIR /home/ray
