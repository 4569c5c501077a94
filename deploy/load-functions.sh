#!/bin/sh
# Loads attnlstm's functions (worker/functions.lua) into Redis as the `loader` user: the
# one-shot `functions` service runs it once Redis is healthy, before the worker starts.
# The worker's own user may call them (FCALL) but not load them. Extra arguments go to
# the CLI: `--tls --cacert FILE` with TLS. Running it again replaces the library, of any
# version (a newer release's too: see deploy/README.md on upgrades).
# From a checkout, for another server (each primary of a cluster):
#   LOADER_PASSWORD_FILE=secrets/redis-loader-password FUNCTIONS_FILE=worker/functions.lua \
#   REDIS_HOST=HOST REDIS_PORT=PORT deploy/load-functions.sh
set -eu

password_file=${LOADER_PASSWORD_FILE:-/run/secrets/redis_loader_password}
library=${FUNCTIONS_FILE:-/etc/attnlstm/functions.lua}
fail() {
    echo "load-functions: $1" >&2
    exit 1
}
cli=$(command -v valkey-cli || command -v redis-cli) || fail "no valkey-cli or redis-cli on PATH"
[ -r "$password_file" ] || fail "cannot read $password_file (LOADER_PASSWORD_FILE)"
[ -r "$library" ] || fail "cannot read $library (FUNCTIONS_FILE)"

REDISCLI_AUTH=$(cat "$password_file")
export REDISCLI_AUTH
reply=$("$cli" -h "${REDIS_HOST:-redis}" -p "${REDIS_PORT:-6379}" --user loader "$@" \
    -x FUNCTION LOAD REPLACE <"$library")
[ "$reply" = attnlstm ] || fail "the server did not load the library: $reply"
echo "load-functions: loaded the attnlstm functions"
