# syntax=docker/dockerfile:1
# The Spate orchestrator image: `spate run` (the in-cluster controller the Helm chart deploys)
# and every other `spate` verb.
#
#   docker build -t <registry>/spate:0.1.0 .
#
# Built from the repository root. The final image is distroless (glibc, CA certificates, no
# shell) and runs as the unprivileged user 65532, which the chart's securityContext expects.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary is copied out
# of the cache mount so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p spate \
    && install -m 0755 target/release/spate /usr/local/bin/spate

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="spate" \
      org.opencontainers.image.description="Event-driven bursting batch orchestrator for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/spate /spate
USER 65532:65532
ENTRYPOINT ["/spate"]
CMD ["run"]
