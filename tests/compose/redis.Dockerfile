# The compose test's Redis, for a host that reaches no image registry: Debian's
# redis-server 7.0 (built with TLS, which the TLS override needs) on the base that
# deploy/base-image.sh bootstraps, under the names the Valkey image gives its programs
# (valkey-server, valkey-cli, docker-entrypoint.sh), so that docker-compose.yml runs it
# as it is. Users get the official valkey/valkey image.
ARG BASE=attnlstm-base:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/redis-server /usr/local/bin/valkey-server \
    && ln -s /usr/bin/redis-cli /usr/local/bin/valkey-cli \
    && mkdir /data \
    && chown redis:redis /data
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
CMD ["docker-entrypoint.sh", "valkey-server"]
