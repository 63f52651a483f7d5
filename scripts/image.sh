#!/usr/bin/env bash
# `make image`: build the tspack serving image from this checkout's own pinned stack (GitHub issue 16).
#
# 1. a Docker engine: when none answers and we are root, start dockerd (and say so);
# 2. the base image: used when present, pulled when it can be, else made with debootstrap under the same tag
#    (only for the default Debian bookworm base), so the one Dockerfile builds on an ordinary host and here;
# 3. the wheelhouse: the venv's exact versions (`pip freeze` as constraints) of tspack's runtime closure,
#    collected once into build/image/wheels (git-ignored), plus a wheel of this checkout; the image installs
#    from it offline;
# 4. the archives and a config for the image (bound to 0.0.0.0) staged in build/image/;
# 5. docker build.
#
# Settings (environment): IMAGE_TAG (tspack-serve:cpu), BASE_IMAGE (debian:bookworm-slim),
# VARIANT (cpu | gpu: CUDA torch and onnxruntime-gpu wheels; documented in docker/README.md, not run here),
# ARCHIVES (model store to package, default model_store), LOAD (archives loaded at start-up; default: the
# demo's three),
# DOCKERD_ARGS (flags for a dockerd this script starts), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
IMAGE_TAG=${IMAGE_TAG:-tspack-serve:${VARIANT}}
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
ARCHIVES=${ARCHIVES:-model_store}
LOAD=${LOAD:-digits_v1.0.mar digits-image-onnx_v2.0.mar digits-image-int8_v2.0.mar}
# vfs needs no kernel overlay support, so it works inside a container or VM too (slower, bigger on disk);
# DOCKERD_ARGS= lets dockerd pick overlay2 where the kernel allows it.
DOCKERD_ARGS=${DOCKERD_ARGS---storage-driver=vfs}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=.venv/bin/python
STAGE=build/image
LOG_DIR=.tspack

say() { echo "image: $*"; }
die() { echo "image: $*" >&2; exit 1; }

ensure_docker() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "no Docker engine answers: start dockerd (or ask an administrator), then rerun"
    if ! command -v dockerd >/dev/null; then
        say "installing docker.io with apt (root, no dockerd found)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    mkdir -p "$LOG_DIR"
    say "no Docker engine answered: starting 'dockerd ${DOCKERD_ARGS}' in the background (log: $LOG_DIR/dockerd.log)"
    # shellcheck disable=SC2086  # DOCKERD_ARGS is a list of flags
    nohup dockerd ${DOCKERD_ARGS} >"$LOG_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && { say "dockerd answers (pid $!)"; return; }
        sleep 1
    done
    die "dockerd did not answer within 60 s: see $LOG_DIR/dockerd.log"
}

make_debian_base() {
    local root
    [ "$(id -u)" = 0 ] || die "$BASE_IMAGE cannot be pulled and only root can make it with debootstrap"
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    root=$(mktemp -d /var/tmp/tspack-bookworm.XXXXXX)
    say "$BASE_IMAGE cannot be pulled: making it with 'debootstrap --variant=minbase bookworm' from $DEBIAN_MIRROR"
    debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$LOG_DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $LOG_DIR/debootstrap.log"
    # As the official slim image: updates and security sources, no documentation or translations, no
    # package lists or caches in the layer.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
EOF
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    # mktemp made the folder 0700, and tar records "." with that mode: the image's / would be closed to
    # every user but root.
    chmod 0755 "$root"
    tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    say "made $BASE_IMAGE ($(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

ensure_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base $BASE_IMAGE: present"
    elif docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base $BASE_IMAGE: pulled"
    elif [ "$BASE_IMAGE" = debian:bookworm-slim ]; then
        make_debian_base
    else
        die "cannot pull $BASE_IMAGE (only debian:bookworm-slim can be made here, with debootstrap)"
    fi
}

collect_wheels() {
    local wheels=$STAGE/wheels own=$STAGE/tspack
    # One wheelhouse per variant: CPU and CUDA builds of torch must not meet in the folder pip installs from.
    if [ -f "$wheels/.variant" ] && [ "$(cat "$wheels/.variant")" != "$VARIANT" ]; then
        say "wheelhouse was collected for $(cat "$wheels/.variant"): starting it again for $VARIANT"
        rm -rf "$wheels"
    fi
    mkdir -p "$wheels" "$own"
    echo "$VARIANT" >"$wheels/.variant"
    [ -x "$PY" ] || die "no $PY: run 'make setup' first"
    # The venv's exact versions, pip and setuptools included; tspack itself (editable) comes as a wheel.
    "$PY" -m pip freeze --all --exclude-editable | grep -v '^#' >"$wheels/constraints.txt"
    if [ "$VARIANT" = gpu ]; then
        # The CUDA build of the same torch release (PyPI's default torch wheel; it brings CUDA and cuDNN
        # as nvidia-* wheels) and onnxruntime-gpu at the onnxruntime version.
        sed -i -e 's/^torch==\([^+]*\)+cpu$/torch==\1/' "$wheels/constraints.txt"
        sed -n 's/^onnxruntime==/onnxruntime-gpu==/p' "$wheels/constraints.txt" >>"$wheels/constraints.txt"
    fi
    # tspack's wheel in its own folder: it changes with every edit of the checkout, the dependencies do not,
    # so the image installs them in separate layers and an edit does not reinstall torch.
    rm -f "$own"/*.whl "$wheels"/tspack-*.whl
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$own" . >/dev/null
    # pip and setuptools too: the image's venv gets the venv's own versions of those as well.
    local extra=(pip setuptools)
    [ "$VARIANT" = gpu ] && extra+=(onnxruntime-gpu)
    say "collecting the wheelhouse in $wheels (files already there are reused)"
    "$PY" -m pip download --quiet --only-binary=:all: --dest "$wheels" -c "$wheels/constraints.txt" \
        "$own"/tspack-*.whl "${extra[@]}" 2> >(grep -v "^WARNING: Location" >&2)
    rm -f "$wheels"/tspack-*.whl
    # requirements.txt: every wheel of the closure at the venv's version (what the image installs).
    "$PY" - "$wheels" <<'PYEOF' || exit 1
import os, re, sys
folder = sys.argv[1]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
with open(os.path.join(folder, "constraints.txt")) as f:
    pins = {norm(line.split("==")[0]): line.strip() for line in f if "==" in line}
wheels = {norm(f.split("-")[0]): f.split("-")[1] for f in os.listdir(folder) if f.endswith(".whl")}
# Only the GPU variant brings wheels the CPU venv lacks (CUDA's nvidia-* libraries): pinned as downloaded.
extra = sorted(n for n in wheels if n not in pins)
if extra:
    print(f"image: not in the venv, pinned as downloaded: {', '.join(f'{n}=={wheels[n]}' for n in extra)}")
with open(os.path.join(folder, "requirements.txt"), "w") as f:
    f.write("".join(pins.get(n, f"{n}=={wheels[n]}") + "\n" for n in sorted(wheels)))
PYEOF
    say "wheelhouse: $(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$wheels" | cut -f1); $(ls "$own")"
}

stage_archives() {
    local store=$STAGE/model-store config=$STAGE/config load_args=()
    ls "$ARCHIVES"/*.mar >/dev/null 2>&1 \
        || die "no .mar in $ARCHIVES: build them first (tspack build --spec config/deploy.yaml --only digits)"
    rm -rf "$store" "$config"
    mkdir -p "$store" "$config"
    cp "$ARCHIVES"/*.mar "$store/"
    for archive in $LOAD; do
        load_args+=(--load "$archive")
    done
    # The image's own config: all interfaces (127.0.0.1 is unreachable from outside a container), token
    # authorization on, model API off, no GPU in the CPU image. The Dockerfile rewrites the host paths.
    local gpus=0
    [ "$VARIANT" = gpu ] && gpus=1
    .venv/bin/tspack config --model-store "$store" "${load_args[@]}" --bind 0.0.0.0 --gpus "$gpus" \
        --out "$config/config.properties" >"$config/placement.txt"
    say "staged $(ls "$store" | wc -l) archive(s) in $store, loading at start: $LOAD"
}

build_image() {
    local args=(--network host -f docker/Dockerfile -t "$IMAGE_TAG" --build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ "$VARIANT" = gpu ] && args+=(--build-arg ONNXRUNTIME_PACKAGE=onnxruntime-gpu)
    # BuildKit needs the buildx plugin from Docker 23 on; without it the classic builder builds the same file.
    docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
    say "docker build ${args[*]} ."
    docker build "${args[@]}" .
    say "built $IMAGE_TAG: $(docker image inspect --format '{{.Size}}' "$IMAGE_TAG" | awk '{printf "%.2f GB", $1/1e9}')"
}

mkdir -p "$LOG_DIR"
ensure_docker
ensure_base
collect_wheels
stage_archives
build_image
