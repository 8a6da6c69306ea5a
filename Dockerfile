# kvm-operator image: build with the Rust toolchain, run on debian-slim with only the shared
# libraries the binary links (checked by tests/packaging.rs) and the ssh client for qemu+ssh.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
RUN cargo build --release --locked --bin kvm-operator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libssl3 zlib1g openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kvm-operator /usr/local/bin/kvm-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kvm-operator"]
CMD ["run", "--http-addr", "0.0.0.0:8080"]
