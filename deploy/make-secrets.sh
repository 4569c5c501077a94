#!/bin/sh
# The secret files docker-compose.yml and docker-compose.tls.yml read, in DIR (default
# $SECRETS_DIR, the folder the compose files read, or else ./secrets): a random password for each Redis user, the key that signs the worker's
# models (model-key), and for TLS a private CA with a certificate for the server
# (names `redis`, `localhost`, 127.0.0.1) that it signed.
# Files already there are kept. The folder is for its owner only; the files in it are
# readable by all, because the containers read them as users of their own.
set -eu

dir=${1:-${SECRETS_DIR:-secrets}}
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 022

for user in worker producer loader reader; do
    [ -s "redis-$user-password" ] || openssl rand -hex 32 >"redis-$user-password"
done
[ -s model-key ] || openssl rand -hex 32 >model-key

if [ ! -s redis-ca.crt ]; then
    # The CA's key is never mounted anywhere: owner only.
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out redis-ca.key)
    openssl req -x509 -new -key redis-ca.key -sha256 -days 3650 -subj "/CN=attnlstm Redis CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out redis-ca.crt
    rm -f redis.crt
fi
if [ ! -s redis.crt ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out redis.key
    openssl req -new -key redis.key -subj "/CN=redis" -out redis.csr
    printf '%s\n' "subjectAltName=DNS:redis,DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth,clientAuth" "keyUsage=critical,digitalSignature" >redis.ext
    openssl x509 -req -in redis.csr -CA redis-ca.crt -CAkey redis-ca.key -CAcreateserial \
        -sha256 -days 825 -extfile redis.ext -out redis.crt
    chmod 644 redis.key # read in its container by the server's own user
    rm -f redis.csr redis.ext redis-ca.srl
fi
