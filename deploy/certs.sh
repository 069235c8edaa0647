#!/usr/bin/env bash
# Make Ferry's mTLS material with openssl: a CA, and one certificate per identity.
#
#   deploy/certs.sh DIR [IDENTITY ...]
#
# IDENTITY is ROLE:NAME[:IP,IP...] with ROLE one of controller, agent, admin. The role goes in
# the certificate's OU (the servers authorize by it), NAME in its CN and as a DNS SAN, the IPs as
# IP SANs (127.0.0.1 always). With no identity: controller:controller and admin:admin.
# Idempotent: an existing CA and existing certificates are kept.
set -euo pipefail

dir=${1:?usage: deploy/certs.sh DIR [ROLE:NAME[:IP,...] ...]}
shift
[ $# -gt 0 ] || set -- controller:controller admin:admin
mkdir -p "$dir"
chmod 700 "$dir"
days=825

if [ ! -s "$dir/ca.crt" ] || [ ! -s "$dir/ca.key" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" \
    -subj "/O=Ferry/CN=Ferry CA" 2>/dev/null
  echo "certs: created CA $dir/ca.crt"
fi

for id in "$@"; do
  IFS=: read -r role name ips <<<"$id"
  case "$role" in controller | agent | admin) ;; *)
    echo "certs: unknown role '$role' in '$id' (use controller, agent or admin)" >&2
    exit 2
    ;;
  esac
  if ! [[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]]; then
    echo "certs: bad name '$name' in '$id' (lowercase letters, digits and '-')" >&2
    exit 2
  fi
  [ -s "$dir/$name.crt" ] && [ -s "$dir/$name.key" ] && continue
  san="DNS:$name,DNS:localhost,IP:127.0.0.1"
  if [ -n "${ips:-}" ]; then
    IFS=, read -ra list <<<"$ips"
    for ip in "${list[@]}"; do san+=",IP:$ip"; done
  fi
  ext=$(mktemp)
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$san" >"$ext"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/O=Ferry/OU=$role/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/$name.crt" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
  chmod 600 "$dir/$name.key"
  echo "certs: issued $role certificate $dir/$name.crt ($san)"
done
