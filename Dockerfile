# syntax=docker/dockerfile:1
# One file, two images, so the gateway and the aggregator deploy and scale separately:
#   docker build --target gateway    -t meter-gateway .
#   docker build --target aggregator -t meter-aggregator .
# See docs/deploy.md.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target dir between builds; the binaries are copied
# out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway -p aggregator \
    && mkdir -p /out && cp target/release/gateway target/release/aggregator /out/

# Both binaries are statically linked against Rust crates (rustls with bundled root
# certificates, the price table compiled in) and need only glibc: a slim Debian suffices.
FROM debian:bookworm-slim AS runtime
RUN useradd --system --user-group --uid 10001 --home-dir /var/lib/meter --create-home meter \
    && mkdir -p /var/lib/meter/spool && chown meter:meter /var/lib/meter/spool
# Health checks use bash's /dev/tcp: bash is in the image already, curl would add megabytes and
# a TLS stack for one local GET. The check passes on an HTTP 200 from the given path.
COPY --chmod=0755 <<'SH' /usr/local/bin/http-ok
#!/bin/bash
# http-ok PORT PATH: exits 0 when http://127.0.0.1:PORT/PATH answers 200.
exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
read -r -t 5 _ status _ <&3 && [ "$status" = 200 ]
SH
USER meter
WORKDIR /var/lib/meter

FROM runtime AS aggregator
COPY --from=build /out/aggregator /usr/local/bin/aggregator
# Inside a container the port is published from outside: listen on every interface.
ENV AGGREGATOR_LISTEN=0.0.0.0:8081
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["http-ok", "8081", "/healthz"]
ENTRYPOINT ["aggregator"]

FROM runtime AS gateway
COPY --from=build /out/gateway /usr/local/bin/gateway
ENV GATEWAY_LISTEN=0.0.0.0:8080
# Events wait here while Redis is unreachable: keep it on a volume, one per gateway container.
ENV GATEWAY_SPOOL_DIR=/var/lib/meter/spool
VOLUME ["/var/lib/meter/spool"]
EXPOSE 8080
# /readyz: the gateway can reach Redis and serve.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["http-ok", "8080", "/readyz"]
ENTRYPOINT ["gateway"]
