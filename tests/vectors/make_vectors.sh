#!/usr/bin/env bash
# Regenerate the CSR test vectors in this directory; README.md says what each one is for.
# Needs only openssl (3.x) and coreutils. Keys are made in a temporary directory and thrown away,
# so every run writes new files: commit them together with any test change they need.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

SUBJ="/O=Vector Labs/CN=vector-csr"   # ignored by the CA: subject and SAN come from the registry

# -- keys (thrown away) --
openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/p256.key"
openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/p256-b.key"
openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/p256-c.key"
openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/rsa2048.key"
openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$tmp/rsa1024.key"
openssl genpkey -quiet -algorithm EC -pkeyopt ec_paramgen_curve:secp256k1 -out "$tmp/secp256k1.key"
openssl genpkey -quiet -algorithm ED25519 -out "$tmp/ed25519.key"

# -- accepted requests --
openssl req -new -key "$tmp/p256.key" -subj "$SUBJ" -outform DER -out p256.csr.der
openssl req -inform DER -in p256.csr.der -outform PEM -out p256.csr.pem
openssl req -new -key "$tmp/rsa2048.key" -subj "$SUBJ" -outform DER -out rsa2048.csr.der
openssl req -new -key "$tmp/ed25519.key" -subj "$SUBJ" -outform DER -out ed25519.csr.der
openssl req -new -key "$tmp/p256-b.key" -subj "/CN=vec-device" \
    -addext "subjectAltName=URI:spiffe://iomt.local/device/vec-device,DNS:vec-device" \
    -outform DER -out own-san.csr.der

# -- refused requests --
openssl req -new -key "$tmp/rsa1024.key" -subj "$SUBJ" -outform DER -out rsa1024.csr.der
openssl req -new -key "$tmp/secp256k1.key" -subj "$SUBJ" -outform DER -out secp256k1.csr.der
openssl req -new -key "$tmp/p256-c.key" -subj "/CN=vec-device" \
    -addext "subjectAltName=URI:spiffe://iomt.local/device/other-device" \
    -outform DER -out other-device-san.csr.der

# bad-signature: p256.csr.der with its last byte (the last octet of the ECDSA signature value s)
# XORed with 0x01; the request still parses, its signature no longer verifies.
size=$(wc -c < p256.csr.der)
last=$(tail -c 1 p256.csr.der | od -An -tu1 | tr -d ' ')
head -c $((size - 1)) p256.csr.der > bad-signature.csr.der
printf "$(printf '\\%03o' $((last ^ 1)))" >> bad-signature.csr.der

# truncated: the first 100 bytes of p256.csr.der (not DER any more)
head -c 100 p256.csr.der > truncated.csr.der

# -- what openssl thinks of them, for the record --
for f in *.csr.der; do
    printf '%-26s ' "$f"
    openssl req -inform DER -in "$f" -noout -verify 2>&1 | head -n 1 || true
done
