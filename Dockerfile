# syntax=docker/dockerfile:1
#
# oppsync container image.
#   docker build -t oppsync .
#   docker run -p 8080:8080 -e OPPSYNC__WEBHOOK__KEYS=... -e OPPSYNC__MARKETO__... oppsync
# Configuration comes from OPPSYNC__SECTION__KEY environment variables and/or a TOML file
# (--config or OPPSYNC_CONFIG); no secret is baked into the image. See docs/operations.md.
# scripts/check-dockerfile.sh checks this file against the repository; scripts/check-image-build.sh
# runs its build stage in the exact build context .dockerignore leaves.

ARG RUST_VERSION=1.95

# ---- build ------------------------------------------------------------------------------
# The full image, not -slim: jemalloc (tikv-jemalloc-sys) is built from C with make, which the
# slim image lacks. Only the binary reaches the runtime stage.
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /build

# Dependencies first, in their own layer: this layer is rebuilt only when Cargo.toml,
# Cargo.lock or the benches change. A placeholder main.rs/lib.rs stands in for the sources. The
# benches come along because Cargo.toml names them and cargo refuses a manifest whose targets
# are missing (`cargo build` does not compile them).
COPY Cargo.toml Cargo.lock ./
# jemalloc's compiled-in defaults (JEMALLOC_SYS_WITH_MALLOC_CONF), read when it is built.
COPY .cargo ./.cargo
COPY benches ./benches
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The sources. `sqlx::migrate!` embeds migrations/ at compile time, so it is copied too.
COPY src ./src
COPY migrations ./migrations
# COPY keeps the files' modification times, which may be older than the placeholder build:
# touch them so cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/oppsync /out/oppsync \
 && install -d -m 0755 /out/var/lib/oppsync

# ---- runtime ----------------------------------------------------------------------------
# Distroless with glibc and CA certificates, no shell; user nonroot = 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/oppsync /usr/local/bin/oppsync
COPY --from=build --chown=65532:65532 /out/var/lib/oppsync /var/lib/oppsync

# SQLite (the default store) lives on this volume; PostgreSQL deployments set
# OPPSYNC__STORE__URL=postgres://... from a Secret instead.
ENV OPPSYNC__STORE__URL=sqlite:///var/lib/oppsync/oppsync.db \
    OPPSYNC__SERVER__LISTEN=0.0.0.0:8080 \
    RUST_LOG=info,sqlx=warn,tower_http=info
VOLUME ["/var/lib/oppsync"]
WORKDIR /var/lib/oppsync

USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/oppsync"]
CMD ["serve", "--log-format", "json"]
