# The specvlm server image.
#
#   docker build -t specvlm .
#   docker run --gpus all -p 8000:8000 -v specvlm-cache:/var/cache/specvlm \
#       -v /srv/models:/models:ro specvlm --model /models/llava-1.5-7b-hf --draft /models/llava-draft
#
# Arguments after the image name go to `specvlm serve`, and every setting can also be
# given as a SPECVLM_* environment variable (`specvlm serve --help` lists them).
# BASE_IMAGE must provide python3 with pip and torch >= 2.4. The default is a CUDA build
# of PyTorch, for GPU hosts. deploy/smoke-test.sh builds this same file on a Debian base
# with the CPU build of torch.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Only the files that the package installs, so that edits elsewhere keep the layer cached.
WORKDIR /opt/specvlm
COPY pyproject.toml README.md ./
COPY server ./server
COPY draft_models ./draft_models
COPY compressors ./compressors

# PIP_CA_BUNDLE is for builds behind a TLS-inspecting proxy: the path of a CA bundle that
# the build mounts (podman build --volume), used by this step only and not stored in the
# image. It goes to pip as PIP_CERT, because pip's isolated build of the package reads the
# environment and not the --cert option. The import check fails the build when the base
# image has no torch.
ARG PIP_CA_BUNDLE=""
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi \
    && python3 -m pip install --no-cache-dir . \
    && python3 -c "import torch, server.cli; print('torch', torch.__version__)"

# The server runs as an unprivileged user. The cache volume holds the demo model, which
# the first start without --model builds from a PyPI package.
RUN useradd --create-home --uid 10001 --user-group specvlm \
    && mkdir -p /var/cache/specvlm \
    && chown specvlm:specvlm /var/cache/specvlm
ENV SPECVLM_HOST=0.0.0.0 \
    SPECVLM_PORT=8000 \
    SPECVLM_CACHE_DIR=/var/cache/specvlm \
    PYTHONUNBUFFERED=1
VOLUME ["/var/cache/specvlm"]
# A numeric user, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/specvlm
EXPOSE 8000

# GET /health returns 200 once the model is loaded and 503 before. The check reads the
# port from SPECVLM_PORT, so set the port with that variable rather than with --port.
# NOTE: start-period is a guess that covers loading a 7B model from local disk. Raise it
# for larger models or slow volumes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SPECVLM_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["specvlm", "serve"]
