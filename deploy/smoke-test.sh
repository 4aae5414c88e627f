#!/usr/bin/env bash
# Build the repository's Dockerfile on a local Debian base with the CPU build of torch,
# run the image on CPU, and check GET /health and one chat request on 127.0.0.1.
#
#   deploy/smoke-test.sh
#
# Needs podman (or docker with a running engine), and for the first run as root:
# debootstrap, which makes the Debian base image when it is not there yet. The server
# in the container serves the demo model from the host's specvlm cache, mounted
# read-only. When that cache has no demo model, the script builds it on the host first
# with `python3 -m server.cli demo-model`, which needs PyPI.
#
# Environment:
#   CONTAINER_ENGINE   podman (default) or docker
#   TORCH_WHEELS       folder with the CPU torch wheel for Python 3.11 (default /opt/wheels)
#   HOST_CA_BUNDLE     CA bundle for pip inside the builds, on machines whose traffic to
#                      the package index passes a TLS-inspecting proxy (podman only; the
#                      file is mounted during the build and not stored in the image)
#   SPECVLM_CACHE_DIR  host cache with demo/target and demo/draft (default ~/.cache/specvlm)
#   PORT               loopback port for the server (default: a free one)
#   KEEP_IMAGE=1       keep the smoke-test image; the two base images are always kept
#                      because making them again takes minutes
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=${CONTAINER_ENGINE:-podman}
DEBIAN_IMAGE=localhost/debian-base:bookworm
CPU_BASE_IMAGE=localhost/specvlm-cpu-base:bookworm
IMAGE=localhost/specvlm:smoke-test
CONTAINER=specvlm-smoke-test-$$
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
MODEL_CACHE=${SPECVLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/specvlm}
PYTHON=${PYTHON:-python3}
STARTUP_TIMEOUT_SECONDS=600

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'smoke test failed: %s\n' "$*" >&2; exit 1; }

ENGINE_COMMAND=("$ENGINE")
WORK_DIR=$(mktemp -d)
cleanup() {
    "${ENGINE_COMMAND[@]}" rm --force "$CONTAINER" >/dev/null 2>&1 || true
    if [[ "${KEEP_IMAGE:-0}" != 1 ]]; then
        "${ENGINE_COMMAND[@]}" rmi --force "$IMAGE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK_DIR"
}
trap cleanup EXIT

# Inside a container, Debian 12's podman 4.3 cannot apply its default ulimits ("error
# setting rlimit ... operation not permitted"), and its default runtime crun fails to start
# containers there too. So the script uses runc and no default ulimits, unless the caller
# sets CONTAINERS_CONF.
if [[ "$ENGINE" == podman ]]; then
    if [[ -z "${CONTAINERS_CONF:-}" ]]; then
        printf '[containers]\ndefault_ulimits = []\n' > "$WORK_DIR/containers.conf"
        export CONTAINERS_CONF="$WORK_DIR/containers.conf"
    fi
    if command -v runc >/dev/null; then
        ENGINE_COMMAND+=(--runtime runc)
    fi
elif [[ "$ENGINE" != docker ]]; then
    fail "CONTAINER_ENGINE=$ENGINE is not supported; use podman or docker"
fi
command -v "$ENGINE" >/dev/null || fail "$ENGINE is not installed"

# Options of both builds. Host networking is the only network that works in a nested
# container, and the CA bundle for pip is mounted when one is given.
BUILD_OPTIONS=(--network=host)
if [[ -n "${HOST_CA_BUNDLE:-}" ]]; then
    [[ -f "$HOST_CA_BUNDLE" ]] || fail "HOST_CA_BUNDLE=$HOST_CA_BUNDLE is not a file"
    [[ "$ENGINE" == podman ]] || fail "HOST_CA_BUNDLE needs podman, because docker build cannot mount files"
    BUILD_OPTIONS+=(--volume "$HOST_CA_BUNDLE:/run/host-ca.crt:ro" --build-arg PIP_CA_BUNDLE=/run/host-ca.crt)
fi
if [[ "$ENGINE" == podman ]]; then
    BUILD_OPTIONS+=(--format docker)  # the OCI image format has no HEALTHCHECK
fi

step "1/6 Debian base image $DEBIAN_IMAGE"
if "${ENGINE_COMMAND[@]}" image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    echo "present, reused"
else
    command -v debootstrap >/dev/null || fail "$DEBIAN_IMAGE is missing and debootstrap is not installed (apt-get install debootstrap)"
    [[ "$(id -u)" == 0 ]] || fail "$DEBIAN_IMAGE is missing, and debootstrap needs root to make it"
    debootstrap --variant=minbase bookworm "$WORK_DIR/rootfs" >"$WORK_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK_DIR/debootstrap.log" >&2; fail "debootstrap failed"; }
    tar -C "$WORK_DIR/rootfs" -c . | "${ENGINE_COMMAND[@]}" import - "$DEBIAN_IMAGE"
    rm -rf "$WORK_DIR/rootfs"
fi

step "2/6 CPU torch base image $CPU_BASE_IMAGE"
if "${ENGINE_COMMAND[@]}" image inspect "$CPU_BASE_IMAGE" >/dev/null 2>&1; then
    echo "present, reused"
else
    mkdir -p "$WORK_DIR/base-context/wheels"
    wheels=("$TORCH_WHEELS"/torch-*-cp311-*.whl)
    [[ -f "${wheels[0]}" ]] || fail "no torch wheel for Python 3.11 in TORCH_WHEELS=$TORCH_WHEELS"
    cp --link "${wheels[0]}" "$WORK_DIR/base-context/wheels/" 2>/dev/null \
        || cp "${wheels[0]}" "$WORK_DIR/base-context/wheels/"
    # The build leaves its untagged wheel stage behind. Remove that one, and no dangling
    # image that was there before.
    "${ENGINE_COMMAND[@]}" images --quiet --filter dangling=true | sort >"$WORK_DIR/dangling-before"
    "${ENGINE_COMMAND[@]}" build "${BUILD_OPTIONS[@]}" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
        --file "$REPO_ROOT/deploy/cpu-base.Dockerfile" --tag "$CPU_BASE_IMAGE" "$WORK_DIR/base-context"
    "${ENGINE_COMMAND[@]}" images --quiet --filter dangling=true | sort \
        | comm -13 "$WORK_DIR/dangling-before" - | xargs --no-run-if-empty "${ENGINE_COMMAND[@]}" rmi
fi

step "3/6 specvlm image $IMAGE from $REPO_ROOT/Dockerfile"
"${ENGINE_COMMAND[@]}" build "${BUILD_OPTIONS[@]}" --build-arg BASE_IMAGE="$CPU_BASE_IMAGE" \
    --file "$REPO_ROOT/Dockerfile" --tag "$IMAGE" "$REPO_ROOT"

step "4/6 demo model in $MODEL_CACHE"
if [[ ! -f "$MODEL_CACHE/demo/target/model.safetensors" || ! -f "$MODEL_CACHE/demo/draft/model.safetensors" ]]; then
    echo "not built yet; building it on the host"
    (cd "$REPO_ROOT" && SPECVLM_CACHE_DIR="$MODEL_CACHE" "$PYTHON" -m server.cli demo-model)
fi
echo "mounted read-only at /var/cache/specvlm"

step "5/6 run the image on CPU"
if [[ -z "${PORT:-}" ]]; then
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
BASE_URL="http://127.0.0.1:$PORT"
# Host networking again, so the server gets --host 127.0.0.1 to stay on loopback. The
# flag also checks that arguments after the image name reach `specvlm serve`, and the
# port goes through SPECVLM_PORT, which the HEALTHCHECK reads too.
started=$SECONDS
"${ENGINE_COMMAND[@]}" run --detach --name "$CONTAINER" --network=host \
    --env SPECVLM_PORT="$PORT" \
    --volume "$MODEL_CACHE:/var/cache/specvlm:ro" \
    "$IMAGE" --host 127.0.0.1 --device cpu --max-num-seqs 2
deadline=$((SECONDS + STARTUP_TIMEOUT_SECONDS))
until curl --silent --fail --output /dev/null "$BASE_URL/health"; do
    if [[ "$("${ENGINE_COMMAND[@]}" inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]]; then
        "${ENGINE_COMMAND[@]}" logs "$CONTAINER" | tail -40 >&2
        fail "the container exited before /health returned 200"
    fi
    if ((SECONDS > deadline)); then
        "${ENGINE_COMMAND[@]}" logs "$CONTAINER" | tail -40 >&2
        fail "/health did not return 200 within $STARTUP_TIMEOUT_SECONDS s"
    fi
    sleep 2
done
echo "GET /health: 200, $((SECONDS - started)) s after the container started"
user_id=$("${ENGINE_COMMAND[@]}" exec "$CONTAINER" id -u)
[[ "$user_id" != 0 ]] || fail "the server runs as root inside the container"
echo "server user id: $user_id"
if [[ "$ENGINE" == podman ]]; then
    "${ENGINE_COMMAND[@]}" healthcheck run "$CONTAINER" || fail "the image's HEALTHCHECK failed"
    echo "HEALTHCHECK: healthy"
fi

step "6/6 one chat request"
curl --silent --show-error --fail --max-time 300 "$BASE_URL/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model": "specvlm-demo", "messages": [{"role": "user", "content": "Name a color."}],
         "max_tokens": 8, "temperature": 0}' >"$WORK_DIR/chat.json" \
    || fail "the chat request failed"
"$PYTHON" - "$WORK_DIR/chat.json" <<'PYTHON'
import json
import sys

response = json.load(open(sys.argv[1]))
tokens = response["usage"]["completion_tokens"]
if tokens < 1:
    sys.exit(f"expected at least one completion token, got {response}")
print(f"chat completion: {tokens} tokens, {response['choices'][0]['message']['content']!r}")
PYTHON
curl --silent --fail "$BASE_URL/metrics" | grep '^specvlm_generation_tokens_total' \
    || fail "/metrics has no specvlm_generation_tokens_total"

printf '\nsmoke test passed\n'
