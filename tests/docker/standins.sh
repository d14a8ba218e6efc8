#!/usr/bin/env bash
# Local stand-ins for the public images that the Dockerfile and the compose files name, for machines that
# cannot reach an image registry (CI here). Each is built from Debian (debootstrap) and PyPI and tagged with
# the public name, so the project's own Dockerfile and compose files run unmodified:
#   pytorch/pytorch:<tag>             Debian bookworm, Python 3.11 in /opt/conda, torch + torchvision
#   heartexlabs/label-studio:<tag>    Label Studio <tag> from PyPI, started as its image starts it
#   redis:7-alpine                    Debian's redis-server, with the official image's entrypoint rule
# An image that is already there is left alone (a registry's real image wins); FORCE=1 rebuilds.
# The machine's CA certificates go into each image (pip and requests are told to use them), so that a
# machine behind a TLS-inspecting proxy can still install from PyPI inside a build.
# Needs root (debootstrap, chroot, bind mounts) and a running Docker daemon.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${STANDIN_CACHE:-$HOME/.cache/label-studio-sam3/docker}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTORCH=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
LS_IMAGE=$(sed -n 's/^ *image: \(heartexlabs\/label-studio:.*\)$/\1/p' docker-compose.yml)
REDIS_IMAGE=$(sed -n 's/^ *image: \(redis:.*\)$/\1/p' docker-compose.yml)
LS_VERSION=${LS_IMAGE##*:}
# torch and torchvision: a matched pair pip finds here (see the README); the real base image has its own.
TORCH=${STANDIN_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PATH_ENV=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CA=/etc/ssl/certs/ca-certificates.crt
CA_ENV=(--change "ENV PIP_CERT=$CA" --change "ENV REQUESTS_CA_BUNDLE=$CA" --change "ENV SSL_CERT_FILE=$CA")

log() { printf '[standins] %s\n' "$*" >&2; }
have() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

base_rootfs() {  # a minimal Debian with Python, made once and kept as a tarball
  local tarball=$CACHE/debian-$SUITE.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
    log "debootstrap $SUITE (once)"
    local dir=$CACHE/rootfs.tmp
    safe_rm "$dir" && mkdir -p "$dir"
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv "$SUITE" "$dir" "$MIRROR" >&2
    tar -C "$dir" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    safe_rm "$dir"
  fi
  echo "$tarball"
}

safe_rm() {  # remove a root folder, never through a mount (a bind-mounted /dev or wheel folder of this machine)
  local dir=$1
  [ -e "$dir" ] || return 0
  awk -v d="$dir/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  if awk -v d="$dir/" 'index($2 "/", d) == 1 {found=1} END {exit !found}' /proc/mounts; then
    log "refusing to remove $dir: something is still mounted under it"; exit 1
  fi
  rm -rf --one-file-system "$dir"
}

MOUNTED=()
cleanup() {
  for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do umount -l "${MOUNTED[i]}" 2>/dev/null || true; done
  MOUNTED=()
}
trap cleanup EXIT

bind() {  # bind-mount $1 at the same path inside root $2 (read-only when $3 = ro)
  [ -e "$1" ] || return 0
  mkdir -p "$2$1"
  mount --bind "$1" "$2$1"
  MOUNTED+=("$2$1")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2$1"; fi
}

new_root() {  # a fresh copy of the base, with this machine's CAs, DNS and pip configuration
  local dir=$CACHE/$1
  safe_rm "$dir" && mkdir -p "$dir"
  tar -C "$dir" -xf "$(base_rootfs)"
  cp /etc/resolv.conf "$dir/etc/resolv.conf"
  cp -a /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp "$CA" "$dir$CA"
  bind /proc "$dir"; bind /dev "$dir"
  # pip inside the chroot reads this machine's indexes and wheel folders (the packages lie on its disk)
  for f in /etc/pip.conf /etc/xdg/pip; do [ -e "$f" ] && mkdir -p "$dir$(dirname $f)" && cp -a "$f" "$dir$f"; done
  for d in /opt/wheels /opt/pypi /opt/pypi-more; do bind "$d" "$dir" ro; done
  echo "$dir"
}

finish_root() {  # unmount, drop this machine's pip configuration, import as $2
  local dir=$1; shift
  local tag=$1; shift
  cleanup
  safe_rm "$dir/proc"; safe_rm "$dir/dev"; mkdir -p "$dir/proc" "$dir/dev"
  for d in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip /root/.cache; do safe_rm "$dir$d"; done
  rm -f "$dir/etc/pip.conf"
  log "importing $tag"
  tar -C "$dir" -c . | docker import "$@" - "$tag" >/dev/null
  safe_rm "$dir"
}

in_root() { chroot "$1" /usr/bin/env -i PATH=$PATH_ENV HOME=/root LANG=C.UTF-8 PIP_CERT=$CA \
              PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 /bin/sh -c "$2"; }

mkdir -p "$CACHE"

if ! have "$PYTORCH"; then
  log "building $PYTORCH (Python in /opt/conda, $TORCH)"
  root=$(new_root pytorch)
  in_root "$root" "python3 -m venv /opt/conda && /opt/conda/bin/pip install -q $TORCH"
  finish_root "$root" "$PYTORCH" --change "ENV PATH=$PATH_ENV" --change "ENV LANG=C.UTF-8" "${CA_ENV[@]}" \
    --change 'CMD ["/bin/bash"]'
fi

if ! have "$LS_IMAGE"; then
  log "building $LS_IMAGE (label-studio==$LS_VERSION from PyPI)"
  root=$(new_root label-studio)
  in_root "$root" "python3 -m venv /opt/label-studio && /opt/label-studio/bin/pip install -q label-studio==$LS_VERSION \
    && useradd --uid 1001 --home-dir /label-studio --create-home labelstudio \
    && mkdir -p /label-studio/data && chown -R 1001 /label-studio"
  finish_root "$root" "$LS_IMAGE" --change "ENV PATH=/opt/label-studio/bin:$PATH_ENV" --change "ENV LANG=C.UTF-8" \
    --change "ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data" --change "ENV HOME=/label-studio" \
    "${CA_ENV[@]}" --change "WORKDIR /label-studio" --change "USER 1001" --change "EXPOSE 8080" \
    --change 'CMD ["label-studio", "start", "--no-browser", "--port", "8080"]'
fi

if ! have "$REDIS_IMAGE"; then
  log "building $REDIS_IMAGE (Debian's redis-server)"
  root=$(new_root redis)
  in_root "$root" "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    redis-server >/dev/null && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis /data"
  # The official image's rule: redis-server in a container listens on every interface without protected mode.
  cat > "$root/usr/local/bin/docker-entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
  case " $* " in *" --protected-mode "*) ;; *) set -- "$@" --protected-mode no --bind '* -::*' ;; esac
  exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
SH
  chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
  finish_root "$root" "$REDIS_IMAGE" --change "ENV PATH=$PATH_ENV" --change "WORKDIR /data" \
    --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["redis-server"]' --change "EXPOSE 6379"
fi
log "stand-ins ready: $PYTORCH, $LS_IMAGE, $REDIS_IMAGE"
