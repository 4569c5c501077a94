#!/bin/sh
# What the Valkey image's entrypoint does before its server starts: the data folder
# given to the server's user, a private umask, and root dropped.
set -eu
if [ "$1" = valkey-server ] && [ "$(id -u)" = 0 ]; then
    find /data \! -user redis -exec chown redis:redis '{}' +
    umask 0077
    exec setpriv --reuid=redis --regid=redis --clear-groups "$0" "$@"
fi
exec "$@"
