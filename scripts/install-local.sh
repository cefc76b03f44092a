#!/usr/bin/env bash
# Install this checkout under PREFIX the way a package would lay it out, so that
# ordinary users can reach it (a checkout under /root is not readable by them):
#   PREFIX/venv/      the Python package and its commands (sees Debian's Python packages)
#   PREFIX/lib/       spank_oci_image.so
#   PREFIX/venv/bin/  also oci-image-launch, which the plugin looks for next to the step client
# Used by `make demo` and by the end-to-end tests. Offline: needs only what
# `make deps` installed.
set -euo pipefail
PREFIX=${1:?usage: install-local.sh PREFIX}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
umask 022
mkdir -p "$PREFIX/lib"
[ -x "$PREFIX/venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$PREFIX/venv"
# Build from a copy: a wheel build writes build/ and *.egg-info next to the sources.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build -cf - \
  pyproject.toml setup.cfg README.md daemon | tar -C "$src" -xf -
"$PREFIX/venv/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index \
  --force-reinstall "$src" 2>&1 | grep -v "^WARNING: Location" || true
"$PREFIX/venv/bin/python" -c "import ociimage" >/dev/null
# the step client as the RPM writes it (not pip's console-script shim)
"$ROOT/scripts/step-wrapper.sh" "$PREFIX/venv/bin/python" \
  "$("$PREFIX/venv/bin/python" -c 'import ociimage, os; print(os.path.dirname(os.path.dirname(ociimage.__file__)))')" \
  "$PREFIX/venv/bin/oci-image-step"
make -s -C "$ROOT/plugin"
install -m 0755 "$ROOT"/plugin/spank_oci_image.so "$PREFIX/lib/"
install -m 0755 "$ROOT"/plugin/oci-image-launch "$PREFIX/venv/bin/"
chmod 0755 "$PREFIX" "$PREFIX/lib"
