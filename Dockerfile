# One image with every role: goim standalone|comet|logic|job|operator.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p goim && cp target/release/goim /goim

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /goim /usr/local/bin/goim
USER 65532:65532
EXPOSE 3101 3102 3108 3109 3111 3119 3128 3129
ENTRYPOINT ["/usr/local/bin/goim"]
