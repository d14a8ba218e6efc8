#!/usr/bin/env bash
# What `make docker-test` needs of this machine: a running Docker daemon (Debian's docker.io), Compose v2
# (`docker compose`) and Compose 1.29 (`docker-compose`, Debian's). Installs what is missing (as root) and
# starts the daemon when it is not running. Idempotent.
set -euo pipefail
log() { printf '[docker-host] %s\n' "$*" >&2; }
apt_install() { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }

command -v dockerd >/dev/null || { log "installing docker.io"; apt_install docker.io; }
command -v docker-compose >/dev/null || { log "installing docker-compose (1.29)"; apt_install docker-compose; }
command -v debootstrap >/dev/null || { log "installing debootstrap"; apt_install debootstrap; }

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd.log >&2; log "dockerd did not start"; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
  # Compose v2 is a Go binary that bookworm does not package; Debian trixie does (docker-compose 2.x):
  # its plugin, taken from trixie's .deb, runs on bookworm (it needs only libc).
  log "installing the Compose v2 plugin from Debian trixie's docker-compose package"
  apt_dir=$(mktemp -d)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  echo "deb http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
  opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache::Archives="$apt_dir/archives" -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq
  (cd "$apt_dir" && apt-get "${opts[@]}" download docker-compose >/dev/null)
  dpkg-deb -x "$apt_dir"/docker-compose_*.deb "$apt_dir/x"
  mkdir -p /usr/local/lib/docker/cli-plugins
  install -m 755 "$apt_dir/x/usr/libexec/docker/cli-plugins/docker-compose" /usr/local/lib/docker/cli-plugins/
  rm -rf "$apt_dir"
fi
log "$(docker version --format 'docker {{.Server.Version}}'), $(docker compose version | head -1), $(docker-compose version --short)"
