#!/usr/bin/env bash
# Ferry test image: builds a small root filesystem as a DETERMINISTIC tar (same inputs -> same
# sha256) from what is already installed on this host, in a second or two (no debootstrap).
#
#   deploy/testkit/build.sh OUT.tar [CLIENT_OUT]
#
# The image holds: busybox-static (/bin/busybox, /bin/sh and every applet as a symlink),
# sockperf and iperf3 with the shared libraries ldd resolves for them (copied at the same paths),
# a minimal /etc, and /usr/local/bin/ferry-echo (ferry-echo.c, static): a TCP service whose state
# lives in memory, for checkpoint/restore tests. CLIENT_OUT, when given, receives the static
# ferry-echo-client (runs on the host or in a client namespace, not in the image).
# Prints "digest sha256:<hex>" and "size <bytes>" on stdout.
set -euo pipefail
export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=0

die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }
[ $# -ge 1 ] || die "usage: build.sh OUT.tar [CLIENT_OUT]"
OUT=$1
CLIENT_OUT=${2:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (install busybox-static)"
for t in gcc tar ldd sockperf iperf3 sha256sum; do command -v "$t" >/dev/null || die "$t not found"; done

W=$(mktemp -d /tmp/ferry-testkit.XXXXXX)
trap 'rm -rf "$W"' EXIT
R=$W/rootfs
mkdir -p "$R"/{bin,sbin,etc,dev,proc,sys,tmp,run,root,var/tmp,usr/bin,usr/local/bin}

# --- static programs: reproducible (no build paths, no timestamps; the build-id hashes content)
cc_static() { # $1 = source (relative to HERE), $2 = output
  (cd "$HERE" && gcc -static -O2 -s -ffile-prefix-map="$HERE"=. -Wl,--build-id=sha1 -o "$2" "$1") \
    || die "cannot build $1 (gcc + libc6-dev needed)"
}
cc_static ferry-echo.c "$R/usr/local/bin/ferry-echo"
if [ -n "$CLIENT_OUT" ]; then
  cc_static ferry-echo-client.c "$W/ferry-echo-client"
  install -m 0755 "$W/ferry-echo-client" "$CLIENT_OUT"
fi

# --- busybox and its applets
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  case $applet in busybox) continue ;; esac
  [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done

# --- dynamic tools with their libraries, at the paths the loader expects
copy_with_libs() { # $1 = program path on the host, $2 = its path in the image
  install -D -m 0755 "$(readlink -f "$1")" "$R$2"
  ldd "$1" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]*ld-linux/ {print $1}' | while read -r lib; do
    [ -e "$R$lib" ] || install -D -m 0644 "$(readlink -f "$lib")" "$R$lib"
  done
}
copy_with_libs "$(command -v sockperf)" /usr/bin/sockperf
copy_with_libs "$(command -v iperf3)" /usr/bin/iperf3
# the dynamic loader must be executable
find "$R" -name 'ld-linux*.so*' -exec chmod 0755 {} +

# --- minimal /etc
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$R/etc/hosts"
printf 'hosts: files dns\n' >"$R/etc/nsswitch.conf"
: >"$R/etc/resolv.conf"
printf 'ferry-testkit\n' >"$R/etc/hostname"

chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 0700 "$R/root"
find "$R" -type d ! -path "$R/tmp" ! -path "$R/var/tmp" ! -path "$R/root" -exec chmod 0755 {} +
find "$R" -type f -path "$R/etc/*" -exec chmod 0644 {} +

# --- deterministic tar: sorted names, fixed times and owners, no pax headers with atime/ctime
mkdir -p "$(dirname "$OUT")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
  -C "$R" -cf "$OUT.tmp" . || die "tar failed"
mv -f "$OUT.tmp" "$OUT"
printf 'digest sha256:%s\n' "$(sha256sum "$OUT" | cut -d' ' -f1)"
printf 'size %s\n' "$(stat -c %s "$OUT")"
