#!/bin/bash
# Test-only stand-in for the real step client (daemon/ociimage/step.py), used to
# prove the SPANK shim on a real cluster without the daemon.  Not for production.
#
# Reads ./config next to itself (LOG, MNT = a mounted image rootfs, RUNTIME, and
# optional FAIL_PREPARE / FAIL_SUBMIT / PREPARE_STDOUT_FILE), logs every call to $LOG.
#   submit --image REF          -> prints REF@sha256:<64 x 'a'>
#   prepare ... --job J --step S --node N [--workdir W] --cwd C --job-env-fd 3
#                               -> pins a mount namespace whose root is $MNT, prints records
#   release --job J --step S --node N -> removes the pinned namespace
set -u
here=$(dirname "$0")
. "$here/config"
printf '%s uid=%s %s\n' "$(date +%s.%N)" "$(id -u)" "$*" >> "$LOG"
cmd=$1; shift
job= step= node= workdir= cwd= image= envfd=
while [ $# -gt 0 ]; do
	case $1 in
	--job) job=$2; shift 2;;
	--step) step=$2; shift 2;;
	--node) node=$2; shift 2;;
	--image) image=$2; shift 2;;
	--workdir) workdir=$2; shift 2;;
	--cwd) cwd=$2; shift 2;;
	--job-env-fd) envfd=$2; shift 2;;
	--writable|--entrypoint) shift;;
	*) shift 2;;
	esac
done
case $cmd in
submit)
	case $image in *fail-submit*) echo "fake: image $image not found in registry" >&2; exit 1;; esac
	echo "resolving $image" >&2
	printf '%s@sha256:%s\n' "$image" "$(printf 'a%.0s' $(seq 64))"
	;;
prepare)
	echo "fake: preparing $image on $node" >&2
	if [ -n "${FAIL_PREPARE:-}" ]; then
		echo "fake: cannot prepare image $image: $FAIL_PREPARE" >&2
		exit 3
	fi
	[ -n "$envfd" ] && tr '\0' '\n' <&"$envfd" > "$RUNTIME/env.$job.$step.$node"
	mkdir -p "$RUNTIME/ns"
	# the pin file must live on a private mount
	(
		flock 9
		if ! mountpoint -q "$RUNTIME/ns"; then
			mount --bind "$RUNTIME/ns" "$RUNTIME/ns" && mount --make-private "$RUNTIME/ns"
		fi
	) 9>"$RUNTIME/ns.lock"
	ns="$RUNTIME/ns/$job.$step.$node"
	touch "$ns"
	unshare --mount="$ns" --propagation private sh -c '
		set -e
		cd "$1"
		mount --bind "$1" "$1"
		mount -t proc proc "$1/proc"
		mount --rbind /dev "$1/dev"
		mount -t tmpfs tmpfs "$1/tmp"
		cd "$1"
		pivot_root . mnt
		/mnt/usr/bin/busybox umount -l /mnt
	' sh "$MNT" >&2 || { echo "fake: namespace setup failed" >&2; exit 4; }
	if [ -n "$workdir" ]; then d=$workdir
	elif [ -d "$MNT$cwd" ]; then d=$cwd
	else d=/
	fi
	if [ -n "${PREPARE_STDOUT_FILE:-}" ]; then cat "$PREPARE_STDOUT_FILE"; exit 0; fi
	printf 'ns\0%s\0cwd\0%s\0env\0OCI_FAKE_IMAGE=%s\0env\0PATH=/bin:/usr/bin\0unsetenv\0OCI_UNSET_ME\0' \
		"$ns" "$d" "$image"
	;;
release)
	ns="$RUNTIME/ns/$job.$step.$node"
	umount "$ns" 2>/dev/null
	rm -f "$ns"
	;;
*) echo "fake: unknown command $cmd" >&2; exit 2;;
esac
