# sluice: a small runtime image, non-root, with the default rules baked in.
#   docker build -t sluice .
#   docker run -p 8081:8081 -p 8080:8080 sluice
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples/envoy/mock_llm.rs ./examples/envoy/mock_llm.rs
RUN cargo build --release --locked --bin sluice \
    && strip target/release/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config /etc/sluice/rules
ENV SLUICE_CONFIG=/etc/sluice/rules \
    SLUICE_GRPC_ADDR=0.0.0.0:8081 \
    SLUICE_HTTP_ADDR=0.0.0.0:8080 \
    SLUICE_LOG_FORMAT=json
EXPOSE 8081 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve"]
