#!/bin/sh
# Entrypoint of the Redis (Valkey) container: renders the ACL file from its template
# with the hash of each user's password, then runs the command it was given (the image's
# own entrypoint and the server). The passwords come from secret files at start: the
# image and the compose file hold none, the rendered file only their SHA-256.
set -eu

template=${ACL_TEMPLATE:-/etc/attnlstm/users.acl.template}
rendered=${ACL_FILE:-/run/attnlstm/users.acl}
worker_file=${WORKER_PASSWORD_FILE:-/run/secrets/redis_worker_password}
producer_file=${PRODUCER_PASSWORD_FILE:-/run/secrets/redis_producer_password}
loader_file=${LOADER_PASSWORD_FILE:-/run/secrets/redis_loader_password}
reader_file=${READER_PASSWORD_FILE:-/run/secrets/redis_reader_password}

# The SHA-256 of the password in file $1: its content without the trailing newlines.
# One with a carriage return (a file saved with Windows line ends) or a line break within
# is refused, as the worker refuses it (worker/settings.py): its hash had the carriage
# return, the worker's password not, and Redis refused a worker its health check passed.
cr=$(printf '\r')
nl='
'
hash_of() {
    password=$(cat "$1")
    if [ -z "$password" ]; then
        echo "redis-entrypoint: $1 holds no password" >&2
        exit 1
    fi
    case $password in
    *"$cr"* | *"$nl"*)
        echo "redis-entrypoint: $1 holds a carriage return or a line break within its" \
            "password (a file saved with Windows line ends?): write it as one line" >&2
        exit 1
        ;;
    esac
    printf %s "$password" | sha256sum | cut -d ' ' -f 1
}

worker_hash=$(hash_of "$worker_file")
producer_hash=$(hash_of "$producer_file")
loader_hash=$(hash_of "$loader_file")
reader_hash=$(hash_of "$reader_file")
mkdir -p "$(dirname "$rendered")"
sed -e '/^#/d' -e '/^[[:space:]]*$/d' \
    -e "s/@WORKER_PASSWORD_SHA256@/$worker_hash/" \
    -e "s/@PRODUCER_PASSWORD_SHA256@/$producer_hash/" \
    -e "s/@LOADER_PASSWORD_SHA256@/$loader_hash/" \
    -e "s/@READER_PASSWORD_SHA256@/$reader_hash/" \
    "$template" >"$rendered"
chmod 644 "$rendered" # read by the server after it drops root; hashes only

# Valkey 8.1 and later log as a large request every command a script runs while the call
# that ran it is over 1 MB: each of the 640 XADDs of a worker's publish of day-ahead
# forecasts (1.8 MB), at a cost in the server's CPU, in a log of 128 entries that then
# shows nothing else. The worker's calls are large by design: no log of large requests
# (worker/embedded.py QUIET_COMMAND_LOG). Redis, and Valkey before 8.1, have no such log.
if [ "$(basename "${2:-}")" = valkey-server ] &&
    "$2" --version | grep -Eq '^Valkey server v=(8\.[1-9]|9\.|[1-9][0-9]+\.)'; then
    set -- "$@" --commandlog-request-larger-than -1
fi
exec "$@"
