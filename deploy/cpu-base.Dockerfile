# A CPU-only stand-in for the PyTorch base image, used by deploy/smoke-test.sh: Debian's
# python3 with the CPU build of torch in a virtual environment at /opt/venv.
#
# The build context must contain wheels/ with one torch wheel for Debian 12's Python 3.11.
# Its dependencies come from the package index.
ARG DEBIAN_IMAGE=localhost/debian-base:bookworm

FROM ${DEBIAN_IMAGE} AS python
# Versions are left to the Debian release that DEBIAN_IMAGE was made from.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS torch
COPY wheels /tmp/wheels
# PIP_CA_BUNDLE: see the same argument in the top-level Dockerfile.
ARG PIP_CA_BUNDLE=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir /tmp/wheels/torch-*.whl

# The wheels stay in the discarded stage above, so the result holds only the installed torch.
FROM python
COPY --from=torch /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
