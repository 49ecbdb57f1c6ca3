#!/usr/bin/env bash
# Make a private CA and a SuperLink certificate for TLS, plus an ECDSA key pair per hospital for
# SuperNode authentication. Run on the coordinator; copy ca.crt (and each hospital's key) over a
# trusted channel. Usage: deploy/gen-certs.sh OUT_DIR COORDINATOR_HOSTNAME [HOSPITAL ...]
set -euo pipefail
out="${1:?usage: gen-certs.sh OUT_DIR COORDINATOR_HOSTNAME [HOSPITAL ...]}"
host="${2:?coordinator host name (as hospitals will dial it)}"
shift 2
mkdir -p "$out"
cd "$out"
umask 077
openssl genrsa -out ca.key 4096
openssl req -x509 -new -key ca.key -sha256 -days 1825 -subj "/CN=fedsight-ca" -out ca.crt
openssl genrsa -out server.key 4096
openssl req -new -key server.key -subj "/CN=${host}" -out server.csr
printf "subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n" "$host" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -extfile san.ext -out server.pem
rm -f server.csr san.ext
for h in "$@"; do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsight-node-${h}" -f "node-${h}"
done
chmod 644 ca.crt server.pem ./*.pub 2>/dev/null || true
echo "wrote $(pwd): ca.crt (give to hospitals), server.pem + server.key (coordinator only)"
[ "$#" -gt 0 ] && echo "node keys: node-<hospital> (private, to that hospital) + .pub (register)"
