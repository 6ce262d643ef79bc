#!/usr/bin/env bash
# Regenerates the DEVELOPMENT certificate authority and server certificate in this folder.
# NOT FOR PRODUCTION: the private keys are public, committed to the repository.
# The server certificate covers localhost, 127.0.0.1 and ::1 and is valid for ten years.
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -out ca.pem \
  -subj "/CN=Portcullis development CA (not for production)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl ecparam -name prime256v1 -genkey -noout -out server.key.ec
openssl pkcs8 -topk8 -nocrypt -in server.key.ec -out server.key
rm server.key.ec
openssl req -new -key server.key -out server.csr -subj "/CN=localhost"
cat > server.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile server.ext -out server.crt
cat server.crt ca.pem > server.pem
rm -f server.csr server.ext ca.srl server.crt
chmod 600 ca.key server.key
echo "wrote ca.pem ca.key server.pem server.key (development only)"
