#!/usr/bin/env bash
# Build the RPM (and SRPM) from this checkout's working tree:
#   packaging/rpm/build.sh TOPDIR [rpmbuild options...]      (`make rpm`: TOPDIR=build/rpm)
# The source tarball holds the tracked files plus untracked files git does not
# ignore, as they are now (uncommitted edits included), so what is tested is
# what is packaged. Outside a git checkout, the tree minus build products.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TOPDIR=${1:?usage: build.sh TOPDIR [rpmbuild options...]}
shift
command -v rpmbuild >/dev/null || { echo "build.sh: rpmbuild not found (Debian: apt-get install rpm; EL: dnf install rpm-build)" >&2; exit 1; }
mkdir -p "$TOPDIR"
TOPDIR=$(cd "$TOPDIR" && pwd)
SPEC=$ROOT/packaging/rpm/slurm-spank-oci-image.spec
NAME=slurm-spank-oci-image
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/daemon/ociimage/__init__.py")
SPEC_VERSION=$(sed -n 's/^Version:[[:space:]]*//p' "$SPEC")
if [ "$VERSION" != "$SPEC_VERSION" ]; then
    echo "build.sh: ociimage.__version__ is $VERSION but the spec says Version: $SPEC_VERSION" >&2
    exit 1
fi
mkdir -p "$TOPDIR"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}
tarball=$TOPDIR/SOURCES/$NAME-$VERSION.tar.gz
list=$(mktemp)
trap 'rm -f "$list"' EXIT
cd "$ROOT"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        sort -z -u > "$list"
else
    find . -path ./.git -prune -o -path ./.venv -prune -o -path ./build -prune -o \
        -name '*.egg-info' -prune -o -name __pycache__ -prune -o \( -type f -o -type l \) -printf '%P\0' |
        sort -z > "$list"
fi
# reproducible: fixed owner, order and mtime (of the last commit, else now)
mtime=$(git log -1 --format=%ct 2>/dev/null || date +%s)
tar --no-recursion --null -T "$list" --transform "s,^,$NAME-$VERSION/," \
    --owner=0 --group=0 --numeric-owner --mtime="@$mtime" --sort=name -cf - | gzip -n > "$tarball"
cp "$SPEC" "$TOPDIR/SPECS/"
rpmbuild -ba --define "_topdir $TOPDIR" "$@" "$TOPDIR/SPECS/$NAME.spec"
