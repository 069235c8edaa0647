#!/usr/bin/env bash
# Ferry host setup: installs what a Ferry edge host needs (runc, CRIU >= 4.2, Open vSwitch,
# iproute2, netfilter tools, load tools, ...). Idempotent; run as root.
#
#   sudo deploy/host/setup.sh            # install / check everything, print a summary
#   FERRY_CRIU_FORCE_PRIVATE=1 ...       # ignore a system criu and use the private prefix
#
# CRIU: Debian 12 ships 3.17 (broken on kernels with the new vDSO) and 4.1 fails on any socket
# on kernels >= 6.16. If the system criu is not >= 4.2, CRIU 4.2.x is taken from Debian sid and
# unpacked into /opt/ferry/criu together with its own libc, without touching the system's apt
# sources or libc. /opt/ferry/bin/criu runs it through the prefix's dynamic loader
# (ld.so --library-path, no LD_LIBRARY_PATH, so tools that criu execs, such as iptables-restore,
# keep the system libc) and /usr/local/sbin/criu points to it so that runc finds it through PATH.
# That wrapper (criu-wrapper.c) also answers runc's per-call VERSION probe from a record of CRIU's
# own answer, which saves a CRIU process at every checkpoint and restore.
#
# /opt/ferry/criu-tools/tar (criu-tar.c, static): the agent puts that directory first on CRIU's
# PATH, so that an empty tmpfs mount is saved and restored without a tar and a gzip process.
set -euo pipefail

FERRY_PREFIX=${FERRY_PREFIX:-/opt/ferry}
CRIU_PREFIX="$FERRY_PREFIX/criu"
CRIU_WRAPPER="$FERRY_PREFIX/bin/criu"
CRIU_LINK=/usr/local/sbin/criu
CRIU_MIN=4.2
CRIU_SUITE=${FERRY_CRIU_SUITE:-sid}

PACKAGES=(
  runc openvswitch-switch iproute2 iptables nftables iperf3 sockperf openssl tini
  openssh-server openssh-client procps util-linux kmod tar xz-utils ca-certificates curl
  gcc libc6-dev busybox-static ethtool
)

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o APT::Get::Assume-Yes=true -q)

say()  { printf '%s\n' "$*"; }
die()  { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

[ "$(id -u)" -eq 0 ] || die "setup.sh must run as root"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
command -v apt-get >/dev/null || die "apt-get not found: a Debian-based host is required"

TMPDIRS=()
POLICY_BACKUP=""
POLICY_INSTALLED=0
cleanup() {
  local d
  if [ "$POLICY_INSTALLED" = 1 ]; then
    if [ -n "$POLICY_BACKUP" ]; then mv -f "$POLICY_BACKUP" /usr/sbin/policy-rc.d
    else rm -f /usr/sbin/policy-rc.d; fi
  fi
  for d in "${TMPDIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | cut -c1-2)" = ii ]; }
pkg_version()   { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }
pkg_candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }

APT_UPDATED=0
apt_update() {
  [ "$APT_UPDATED" = 1 ] && return 0
  say "apt: updating package lists"
  apt-get "${APT_OPTS[@]}" update >/tmp/ferry-apt-update.log 2>&1 \
    || { cat /tmp/ferry-apt-update.log >&2; die "apt-get update failed"; }
  APT_UPDATED=1
}

# No service may start while packages are installed (Ferry runs its own ovsdb-server and
# ovs-vswitchd per emulated host; PID 1 here is not an init system anyway).
block_services() {
  [ "$POLICY_INSTALLED" = 1 ] && return 0
  if [ -e /usr/sbin/policy-rc.d ]; then
    POLICY_BACKUP=$(mktemp /usr/sbin/.policy-rc.d.ferry-backup.XXXXXX)
    cp -p /usr/sbin/policy-rc.d "$POLICY_BACKUP"
  fi
  printf '#!/bin/sh\n# written by ferry deploy/host/setup.sh during package installation\nexit 101\n' \
    >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  POLICY_INSTALLED=1
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    if pkg_installed "$p"; then say "ok: $p $(pkg_version "$p") (already installed)"
    else missing+=("$p"); fi
  done
  [ "${#missing[@]}" -eq 0 ] && return 0

  # update the lists only if one of the missing packages is unknown to apt-cache
  for p in "${missing[@]}"; do
    c=$(pkg_candidate "$p")
    if [ -z "$c" ] || [ "$c" = "(none)" ]; then apt_update; break; fi
  done
  for p in "${missing[@]}"; do
    c=$(pkg_candidate "$p")
    [ -n "$c" ] && [ "$c" != "(none)" ] || die "package $p is not available from the configured apt sources"
  done

  block_services
  say "apt: installing ${missing[*]}"
  if ! apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}" \
       >/tmp/ferry-apt-install.log 2>&1; then
    # stale lists give 404s: refresh once and retry
    if [ "$APT_UPDATED" = 0 ]; then
      apt_update
      apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}" \
        >/tmp/ferry-apt-install.log 2>&1 \
        || { tail -n 30 /tmp/ferry-apt-install.log >&2; die "apt-get install ${missing[*]} failed (log: /tmp/ferry-apt-install.log)"; }
    else
      tail -n 30 /tmp/ferry-apt-install.log >&2
      die "apt-get install ${missing[*]} failed (log: /tmp/ferry-apt-install.log)"
    fi
  fi
  for p in "${missing[@]}"; do
    pkg_installed "$p" || die "package $p is still not installed after apt-get install"
    say "installed: $p $(pkg_version "$p")"
  done
}

# ---------------------------------------------------------------------------------------------
# 2. CRIU >= 4.2
# ---------------------------------------------------------------------------------------------
criu_version() { # $1 = criu command; prints e.g. 4.2.1
  "$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}
criu_check_ok() { "$1" check >/dev/null 2>&1; }

criu_usable() { # $1 = criu command
  local v
  [ -x "$1" ] || return 1
  v=$(criu_version "$1") || return 1
  [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" && criu_check_ok "$1"
}

CRIU_KIND=""
CRIU_BIN=""

ld_so() { # the prefix's dynamic loader
  local f
  for f in "$CRIU_PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
           "$CRIU_PREFIX/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
           "$CRIU_PREFIX/usr/lib64/ld-linux-x86-64.so.2" "$CRIU_PREFIX/lib64/ld-linux-x86-64.so.2"; do
    [ -e "$f" ] && { printf '%s\n' "$f"; return 0; }
  done
  return 1
}
LIBPATH="$CRIU_PREFIX/usr/lib/x86_64-linux-gnu:$CRIU_PREFIX/lib/x86_64-linux-gnu:$CRIU_PREFIX/usr/lib:$CRIU_PREFIX/lib"

write_wrapper() {
  local ld
  ld=$(ld_so) || die "no ld-linux-x86-64.so.2 in $CRIU_PREFIX (libc6 from $CRIU_SUITE not unpacked?)"
  mkdir -p "$(dirname "$CRIU_WRAPPER")" "$CRIU_PREFIX/ld"
  # the loader is exec'd through a symlink named criu so that the process's comm is "criu"
  # (ps, pgrep -x criu), not "ld-linux-x86-64"; /proc/PID/exe still points to the loader
  ln -sfn "$ld" "$CRIU_PREFIX/ld/criu"
  # criu-wrapper.c: runs CRIU through that loader (no LD_LIBRARY_PATH on purpose: programs that
  # criu executes, iptables-restore, ip, nft, ..., must keep the system's libc), and answers
  # runc's VERSION probes from a record of this binary's own answer.
  local src tmp
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-wrapper.c"
  tmp=$(mktemp "$CRIU_WRAPPER.XXXXXX")
  gcc -O2 -static -Wall -Wextra -Werror \
    -DCRIU_LOADER="\"$CRIU_PREFIX/ld/criu\"" -DCRIU_LIBPATH="\"$LIBPATH\"" \
    -DCRIU_BINARY="\"$CRIU_PREFIX/usr/sbin/criu\"" -DCRIU_VERSION_RECORD="\"$CRIU_PREFIX/version-response\"" \
    -o "$tmp" "$src" || { rm -f "$tmp"; die "cannot build $src"; }
  chmod 755 "$tmp"
  mv -f "$tmp" "$CRIU_WRAPPER"
}

link_criu() {
  mkdir -p "$(dirname "$CRIU_LINK")"
  if [ "$(readlink "$CRIU_LINK" 2>/dev/null)" != "$CRIU_WRAPPER" ]; then
    if [ -e "$CRIU_LINK" ] && [ ! -L "$CRIU_LINK" ]; then
      mv -f "$CRIU_LINK" "$CRIU_LINK.ferry-old"
      say "moved: previous $CRIU_LINK to $CRIU_LINK.ferry-old"
    fi
    ln -sfn "$CRIU_WRAPPER" "$CRIU_LINK"
    say "linked: $CRIU_LINK -> $CRIU_WRAPPER"
  else
    say "ok: $CRIU_LINK -> $CRIU_WRAPPER"
  fi
}

install_private_criu() {
  local mirror aptdir srclist lists cache pkgs debs p d missing
  mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
             /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
             /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  mirror=${mirror%/}

  aptdir="$CRIU_PREFIX/apt"
  srclist="$aptdir/sources.list"
  lists="$aptdir/lists"
  cache="$aptdir/cache"
  mkdir -p "$lists/partial" "$cache/archives/partial"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -r "$keyring" ] || die "$keyring missing (package debian-archive-keyring)"
  printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$CRIU_SUITE" >"$srclist"

  local PAPT=(-o Dir::Etc::SourceList="$srclist" -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists="$lists" -o Dir::Cache="$cache"
              -o Dir::State::status=/dev/null -o Dir::Etc::Preferences=/dev/null
              -o Dir::Etc::PreferencesParts=/dev/null -o APT::Architecture=amd64
              -o APT::Architectures::=amd64 -o Debug::NoLocking=1 -q)

  say "criu: fetching the $CRIU_SUITE package index from $mirror (private lists in $lists)"
  apt-get "${PAPT[@]}" update >"$aptdir/update.log" 2>&1 \
    || { tail -n 20 "$aptdir/update.log" >&2; die "private apt-get update for $CRIU_SUITE failed (log: $aptdir/update.log)"; }

  local cv
  cv=$(apt-cache "${PAPT[@]}" show --no-all-versions criu 2>/dev/null | awk '/^Version:/ {print $2; exit}')
  [ -n "$cv" ] || die "criu is not in Debian $CRIU_SUITE"
  version_ge "${cv#*:}" "$CRIU_MIN" || die "Debian $CRIU_SUITE has criu $cv, need >= $CRIU_MIN"

  # criu, libcompel1, libc6 and the closure of the shared libraries they depend on
  mapfile -t pkgs < <(
    apt-cache "${PAPT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances --no-pre-depends criu libcompel1 libc6 2>/dev/null \
      | awk '/^[a-z0-9]/ {print $1}' | grep -E '^(criu|libcompel1|libc6|lib[a-z0-9].*)$' \
      | grep -vE '^(libc-bin|libc-l10n|libc-gconv-modules-extra|libc6-dev|libcrypt-dev|libpython.*|libperl.*)$' \
      | sort -u)
  [ "${#pkgs[@]}" -gt 0 ] || die "could not resolve the dependencies of criu in $CRIU_SUITE"

  say "criu: downloading ${#pkgs[@]} packages: ${pkgs[*]}"
  local dl="$aptdir/debs"
  rm -rf "$dl"; mkdir -p "$dl"
  (cd "$dl" && apt-get "${PAPT[@]}" download "${pkgs[@]}" >"$aptdir/download.log" 2>&1) \
    || { tail -n 20 "$aptdir/download.log" >&2; die "apt-get download from $CRIU_SUITE failed (log: $aptdir/download.log)"; }

  # unpack into a fresh tree, then swap it in
  local stage="$CRIU_PREFIX.new"
  rm -rf "$stage"; mkdir -p "$stage"
  for d in "$dl"/*.deb; do dpkg-deb -x "$d" "$stage"; done
  local old="$CRIU_PREFIX.old"
  rm -rf "$old"
  mkdir -p "$CRIU_PREFIX"
  mv "$CRIU_PREFIX" "$old"
  mv "$stage" "$CRIU_PREFIX"
  mv "$old/apt" "$CRIU_PREFIX/apt"
  # keep only the private sources.list and logs; the sid index (~20 MB) is fetched again when needed
  rm -rf "$old" "$CRIU_PREFIX/apt/debs" "$CRIU_PREFIX/apt/lists" "$CRIU_PREFIX/apt/cache" \
         "$CRIU_PREFIX/usr/share/doc" "$CRIU_PREFIX/usr/share/man" "$CRIU_PREFIX/usr/share/locale"

  write_wrapper
  # every library criu needs must come from the prefix
  local ld
  ld=$(ld_so)
  missing=$("$ld" --library-path "$LIBPATH" --list "$CRIU_PREFIX/usr/sbin/criu" 2>&1 | grep 'not found' || true)
  [ -z "$missing" ] || die "private criu is missing libraries: $missing"
  if "$ld" --library-path "$LIBPATH" --list "$CRIU_PREFIX/usr/sbin/criu" | grep -E '=> /(usr/)?lib' \
       | grep -v "$CRIU_PREFIX" >&2; then
    die "private criu would load system libraries (above); refusing mixed libc"
  fi
  printf 'criu %s from Debian %s (%s), installed %s\n' "$cv" "$CRIU_SUITE" "$mirror" "$(date -u +%FT%TZ)" \
    >"$CRIU_PREFIX/FERRY-INSTALLED"
  say "installed: criu $cv from Debian $CRIU_SUITE into $CRIU_PREFIX ($(du -sh "$CRIU_PREFIX" | cut -f1))"
}

setup_criu() {
  local sys v
  # a system criu (not our own link) that is good enough wins
  for sys in /usr/sbin/criu /usr/bin/criu; do
    if [ -z "${FERRY_CRIU_FORCE_PRIVATE:-}" ] && criu_usable "$sys"; then
      CRIU_KIND=system; CRIU_BIN=$sys
      say "ok: criu $(criu_version "$sys") (system, $sys)"
      return 0
    fi
    if [ -x "$sys" ]; then
      v=$(criu_version "$sys" || true)
      say "note: system criu ${v:-?} at $sys is not usable (need >= $CRIU_MIN and a passing 'criu check')"
    fi
  done

  if [ -f "$CRIU_PREFIX/FERRY-INSTALLED" ] && [ -x "$CRIU_WRAPPER" ] && criu_usable "$CRIU_WRAPPER"; then
    write_wrapper   # cheap; keeps the wrapper in the current format
    say "ok: criu $(criu_version "$CRIU_WRAPPER") (private, $CRIU_PREFIX, already installed)"
  else
    install_private_criu
    v=$(criu_version "$CRIU_WRAPPER" || true)
    [ -n "$v" ] || die "private criu does not run: $("$CRIU_WRAPPER" --version 2>&1 | tail -n 3)"
    version_ge "$v" "$CRIU_MIN" || die "private criu is $v, need >= $CRIU_MIN"
    criu_check_ok "$CRIU_WRAPPER" \
      || die "private criu $v fails 'criu check': $("$CRIU_WRAPPER" check 2>&1 | tail -n 5)"
  fi
  link_criu
  CRIU_KIND=private; CRIU_BIN=$CRIU_WRAPPER
  # what runc will actually find
  local found
  found=$(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" command -v criu || true)
  [ "$found" = "$CRIU_LINK" ] || die "criu on PATH is $found, not $CRIU_LINK"
}

# CRIU's "tar" for empty tmpfs mounts (criu-tar.c): the agent puts this directory first on the
# PATH of runc, and so of CRIU (ferry-agent --criu-tools). Rebuilt when the source changes.
CRIU_TOOLS=${FERRY_CRIU_TOOLS:-$FERRY_PREFIX/criu-tools}
setup_criu_tools() {
  local src tmp
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-tar.c"
  if [ -x "$CRIU_TOOLS/tar" ] && cmp -s "$src" "$CRIU_TOOLS/criu-tar.c"; then
    say "ok: $CRIU_TOOLS/tar (CRIU's tar for empty tmpfs mounts)"
    return 0
  fi
  mkdir -p "$CRIU_TOOLS"
  tmp=$(mktemp "$CRIU_TOOLS/tar.XXXXXX")
  gcc -O2 -static -Wall -Wextra -Werror -o "$tmp" "$src" || { rm -f "$tmp"; die "cannot build $src"; }
  chmod 755 "$tmp"
  mv -f "$tmp" "$CRIU_TOOLS/tar"
  cp "$src" "$CRIU_TOOLS/criu-tar.c"
  say "built: $CRIU_TOOLS/tar (CRIU's tar for empty tmpfs mounts)"
}

# ---------------------------------------------------------------------------------------------
# 3. Summary
# ---------------------------------------------------------------------------------------------
summary() {
  local out rc=0 line
  say "---- ferry host summary ----"
  say "kernel:       $(uname -r)"
  say "runc:         $(runc --version 2>/dev/null | awk '/^runc version/ {print $3; exit}')"
  say "criu:         $(criu_version "$CRIU_BIN") ($CRIU_KIND: $CRIU_BIN)"
  say "ovs-vswitchd: $(ovs-vswitchd --version 2>/dev/null | awk 'NR==1 {print $NF}')"
  say "iproute2:     $(ip -V 2>/dev/null | sed -e 's/.*iproute2-//; s/^ip utility, //')"
  say "iperf3:       $(iperf3 --version 2>/dev/null | awk 'NR==1 {print $2}')"
  say "sockperf:     $(pkg_version sockperf)"
  say "tini:         $(tini --version 2>/dev/null | awk '{print $3}')"
  say "cgroups:      $(if [ -f /sys/fs/cgroup/cgroup.controllers ]; then echo v2; elif [ -d /sys/fs/cgroup/freezer ]; then echo 'v1 (hybrid/legacy)'; else echo unknown; fi)"
  out=$("$CRIU_BIN" check 2>&1) || rc=$?
  if [ "$rc" -eq 0 ]; then say "criu check:   $(printf '%s' "$out" | tail -n1)"
  else printf '%s\n' "$out" >&2; die "criu check failed (exit $rc)"; fi
  rc=0
  out=$("$CRIU_BIN" check --all 2>&1) || rc=$?
  while IFS= read -r line; do
    [ -n "$line" ] && say "info: criu check --all: $line"
  done <<<"$(printf '%s\n' "$out" | grep -vx 'Looks good\.' || true)"
  [ "$rc" -eq 0 ] || say "info: criu check --all exit $rc (optional features; e.g. 'Dirty tracking is OFF' is expected here: no pre-dump)"
  say "ferry host setup: done"
}

install_packages
setup_criu
setup_criu_tools
summary
