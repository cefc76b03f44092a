#!/usr/bin/env bash
# `make demo`: a local registry, a 3-node Slurm cluster on this machine, one
# oci-imaged per node sharing one cache directory, a demo image, and
# `srun -N3 --oci-image=...` run as an ordinary user, then a pyxis-style
# `srun --container-image=... --container-mounts=...` (plugstack pyxis_aliases=yes:
# pyxis' scripts run unchanged).  `make demo-stop` tears it all down.  Safe to run
# again: what already runs is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${OCI_DEMO_STATE:-/var/tmp/oci-image-demo}
PORT=${OCI_DEMO_REGISTRY_PORT:-5000}
REGISTRY=127.0.0.1:$PORT
IMAGE=$REGISTRY/demo/busybox:latest
NODES="n1 n2 n3"
DEMO_USER=ocitest
INSTALL=${OCI_DEMO_PREFIX:-/opt/oci-image-demo}
VENV=$INSTALL/venv
PY=/usr/bin/python3

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_registry() {
  mkdir -p "$STATE/registry"
  if alive "$STATE/registry/pid"; then return; fi
  cat >"$STATE/registry/config.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $STATE/registry/data}, delete: {enabled: true}}
http: {addr: $REGISTRY}
EOF
  setsid docker-registry serve "$STATE/registry/config.yml" >"$STATE/registry/log" 2>&1 &
  echo $! >"$STATE/registry/pid"
  for _ in $(seq 100); do curl -fs "http://$REGISTRY/v2/" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "registry did not start; see $STATE/registry/log" >&2; exit 1
}

start_daemons() {
  mkdir -p "$STATE/cache"
  for n in $NODES; do
    mkdir -p "$STATE/$n"
    if alive "$STATE/$n/pid"; then continue; fi
    setsid "$VENV/bin/oci-imaged" --config /dev/null --socket "$STATE/$n/oci-imaged.sock" \
      --runtime-dir "$STATE/$n/run" --cache-dir "$STATE/cache" --node "$n" \
      --log-level info >"$STATE/$n/log" 2>&1 &
    echo $! >"$STATE/$n/pid"
  done
  for n in $NODES; do
    for _ in $(seq 200); do [ -S "$STATE/$n/oci-imaged.sock" ] && break; sleep 0.05; done
    [ -S "$STATE/$n/oci-imaged.sock" ] || { echo "oci-imaged on $n did not start; see $STATE/$n/log" >&2; exit 1; }
  done
}

build_image() {
  if skopeo inspect --tls-verify=false "docker://$IMAGE" >/dev/null 2>&1; then return; fi
  local w; w=$(mktemp -d)
  umoci init --layout "$w/oci" && umoci new --image "$w/oci:demo"
  umoci unpack --image "$w/oci:demo" "$w/b" >/dev/null
  local r=$w/b/rootfs
  mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/home" && chmod 1777 "$r/tmp"
  cp /usr/bin/busybox "$r/bin/busybox"
  for a in sh cat ls id pwd env echo grep head hostname uname sleep true; do ln -sf busybox "$r/bin/$a"; done
  printf 'PRETTY_NAME="BusyBox demo image (slurm-oci-image)"\nID=busybox-demo\n' >"$r/etc/os-release"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"; printf 'root:x:0:\n' >"$r/etc/group"
  umoci repack --image "$w/oci:demo" "$w/b" >/dev/null
  umoci config --image "$w/oci:demo" --config.env PATH=/bin --config.cmd /bin/sh
  skopeo copy --quiet --dest-tls-verify=false "oci:$w/oci:demo" "docker://$IMAGE"
  rm -rf "$w"
}

start() {
  [ "$(id -u)" = 0 ] || { echo "make demo must run as root (it starts slurmd and mounts images)" >&2; exit 1; }
  say "installing this checkout under $INSTALL"; scripts/install-local.sh "$INSTALL"
  say "registry on $REGISTRY"; start_registry
  say "demo image $IMAGE"; build_image
  say "oci-imaged on $NODES (shared cache $STATE/cache)"; start_daemons
  # This host is also the login node: n1's daemon answers srun's tag lookups and
  # sbatch's prefetches (its user socket). pyxis_aliases=yes: pyxis' option names too.
  cat >"$STATE/plugstack.conf" <<EOF
required $INSTALL/lib/spank_oci_image.so step_client=$VENV/bin/oci-image-step socket=$STATE/%n/oci-imaged.sock prefetch_socket=$STATE/n1/oci-imaged-prefetch.sock pyxis_aliases=yes
EOF
  say "3-node Slurm cluster"
  $PY scripts/localcluster.py start --state-dir "$STATE/slurm" --nodes 3 \
    --plugstack "$STATE/plugstack.conf" --user "$DEMO_USER" >/dev/null
  eval "$($PY scripts/localcluster.py env --state-dir "$STATE/slurm")"
  chmod 755 "$STATE"
  say "as $DEMO_USER: srun -N3 --oci-image=$IMAGE ..."
  cd /tmp
  runuser -u "$DEMO_USER" -- env SLURM_CONF="$SLURM_CONF" srun -N3 -l --oci-image="$IMAGE" \
    sh -c 'echo "node $SLURMD_NODENAME: $(grep PRETTY_NAME /etc/os-release)"' | sort
  # a host directory for the pyxis-style step: read-only in the container, beside a tmpfs
  mkdir -p "$STATE/data" && chmod 755 "$STATE/data"
  echo "hello from $STATE/data on the host" >"$STATE/data/hello.txt" && chmod 644 "$STATE/data/hello.txt"
  local pyxis_image="$REGISTRY#demo/busybox:latest" mounts="$STATE/data:/data:ro+rprivate,tmpfs:/scratch"
  say "as $DEMO_USER, pyxis-style: srun --container-image=$pyxis_image --container-mounts=$mounts ..."
  runuser -u "$DEMO_USER" -- env SLURM_CONF="$SLURM_CONF" srun -N1 \
    --container-image="$pyxis_image" --container-mounts="$mounts" \
    sh -c 'cat /data/hello.txt; echo scratch > /scratch/f && echo "/scratch (a tmpfs) is writable"'
  say "cached images"
  "$VENV/bin/oci-image" --socket "$STATE/n1/oci-imaged.sock" ls
  echo
  echo "Try it yourself:  export SLURM_CONF=$SLURM_CONF"
  echo "                  runuser -u $DEMO_USER -- srun -N3 --oci-image=$IMAGE cat /etc/os-release"
  echo "pyxis-style:      runuser -u $DEMO_USER -- srun --container-image=$REGISTRY#demo/busybox:latest \\"
  echo "                    --container-mounts=$STATE/data:/data:ro cat /data/hello.txt"
  echo "Stop it all:      make demo-stop"
}

stop() {
  if [ -f "$STATE/slurm/cluster.json" ]; then
    $PY scripts/localcluster.py stop --state-dir "$STATE/slurm" >/dev/null || true
  fi
  for n in $NODES; do
    if alive "$STATE/$n/pid"; then kill "$(cat "$STATE/$n/pid")"; fi
  done
  for n in $NODES; do
    # oci-imaged exits within its [daemon] stop_timeout (5s) whatever is in flight;
    # one still there after 10s is stuck: kill it rather than leave it behind
    for _ in $(seq 100); do alive "$STATE/$n/pid" || break; sleep 0.1; done
    if alive "$STATE/$n/pid"; then
      say "oci-imaged $n did not stop on SIGTERM; killing it"
      kill -KILL "$(cat "$STATE/$n/pid")" 2>/dev/null || true
      rm -f "$STATE/$n/oci-imaged.sock" "$STATE/$n/oci-imaged-prefetch.sock"
    fi
    rm -f "$STATE/$n/pid"
  done
  # Step namespaces and image mounts outlive a daemon on purpose (running
  # steps keep working); the demo owns them all, so it removes them here.
  findmnt -rn -o TARGET | grep "^$STATE/" | sort -r | while read -r m; do umount -l "$m" || true; done
  if alive "$STATE/registry/pid"; then kill "$(cat "$STATE/registry/pid")"; rm -f "$STATE/registry/pid"; fi
  say "demo stopped (state kept in $STATE; remove it for a fresh start)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
