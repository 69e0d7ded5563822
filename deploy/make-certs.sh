#!/usr/bin/env bash
# Create a private CA and a SuperLink server certificate signed by it.
#
#   deploy/make-certs.sh OUT_DIR [SAN ...]
#
# Writes OUT_DIR/ca.crt (give it to every SuperNode and to `flwr`), OUT_DIR/ca.key (keep it
# offline), OUT_DIR/server.pem and OUT_DIR/server.key (the SuperLink's). The server certificate
# is valid for IP:127.0.0.1 and DNS:localhost plus every SAN given, e.g. IP:10.0.0.5 or
# DNS:superlink.example.org (a bare address or name is accepted too). Existing files in OUT_DIR
# are overwritten. Needs only openssl.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
out="$1"
shift
days="${CERT_DAYS:-825}"

sans=("IP:127.0.0.1" "DNS:localhost")
for san in "$@"; do
    case "$san" in
        IP:* | DNS:*) sans+=("$san") ;;
        *[!0-9.]*) sans+=("DNS:$san") ;;  # anything that is not a dotted IPv4 is a name
        *) sans+=("IP:$san") ;;
    esac
done
san_line=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -sha384 -nodes -days "$days" \
    -keyout ca.key -out ca.crt -subj "/CN=feddistill-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -sha384 -nodes -keyout server.key -out server.csr \
    -subj "/CN=feddistill-superlink" 2>/dev/null

cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san_line
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.pem -days "$days" -sha384 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "wrote $out/ca.crt, $out/ca.key, $out/server.pem, $out/server.key (SAN $san_line)"
