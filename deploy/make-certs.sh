#!/usr/bin/env bash
# Create a private CA and a SuperLink server certificate signed by it.
#
#   deploy/make-certs.sh OUT_DIR [SAN ...]
#
# Writes OUT_DIR/ca.crt (give it to every SuperNode and to `flwr`), OUT_DIR/ca.key (keep it
# off the server, safe), OUT_DIR/server.pem and OUT_DIR/server.key (the SuperLink's). The server
# certificate is valid for IP:127.0.0.1 and DNS:localhost plus every SAN given, e.g. IP:10.0.0.5
# or DNS:superlink.example.org (a bare address or name works too). A CA already in OUT_DIR is
# reused, so rerunning to add an address needs no new ca.crt on the devices. CERT_DAYS sets the
# validity (default 825 days). Needs only openssl. Keys are ECDSA P-384.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
out="$1"
shift
days="${CERT_DAYS:-825}"
curve=(-newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -sha384 -nodes)

quiet() {  # run a command, showing its output only if it fails
    local msg
    if ! msg=$("$@" 2>&1); then
        echo "$msg" >&2
        return 1
    fi
}

sans=("IP:127.0.0.1" "DNS:localhost")
for san in "$@"; do
    case "$san" in
        IP:* | DNS:*) sans+=("$san") ;;
        *:*) sans+=("IP:$san") ;;          # a bare IPv6 address
        *[!0-9.]*) sans+=("DNS:$san") ;;   # not a dotted IPv4 address: a name
        *) sans+=("IP:$san") ;;
    esac
done
san_line=$(IFS=,; echo "${sans[*]}")

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

if [[ -f ca.key && -f ca.crt ]]; then
    echo "reusing the CA in $out"
else
    quiet openssl req -x509 "${curve[@]}" -days "$days" -keyout ca.key -out ca.crt \
        -subj "/CN=feddistill-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

quiet openssl req "${curve[@]}" -keyout server.key -out server.csr -subj "/CN=feddistill-superlink"
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san_line
EXT
quiet openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.pem -days "$days" -sha384 -extfile server.ext
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem

quiet openssl verify -CAfile ca.crt server.pem
echo "wrote $out/ca.crt, $out/ca.key, $out/server.pem, $out/server.key (SAN $san_line)"
