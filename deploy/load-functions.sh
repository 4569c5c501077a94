#!/bin/sh
# Loads attnlstm's functions (worker/functions.lua) into Redis as the `loader` user: the
# one-shot `functions` service runs it once Redis is healthy, before the worker starts.
# The worker's own user may call them (FCALL) but not load them. Extra arguments go to
# the CLI: `--tls --cacert FILE` with TLS. Running it again replaces the library.
set -eu

password_file=${LOADER_PASSWORD_FILE:-/run/secrets/redis_loader_password}
library=${FUNCTIONS_FILE:-/etc/attnlstm/functions.lua}
cli=$(command -v valkey-cli || command -v redis-cli)

REDISCLI_AUTH=$(cat "$password_file")
export REDISCLI_AUTH
reply=$("$cli" -h "${REDIS_HOST:-redis}" -p "${REDIS_PORT:-6379}" --user loader "$@" \
    -x FUNCTION LOAD REPLACE <"$library")
if [ "$reply" != attnlstm ]; then
    echo "load-functions: the server did not load the library: $reply" >&2
    exit 1
fi
echo "load-functions: loaded the attnlstm functions"
