//! TLS and mutual TLS on the gRPC listener, with a real Envoy: certificates made by the test
//! (rcgen), Envoy presenting a client certificate passes and is rate limited; a client without
//! one, or with one for another name, is refused; a rotated server certificate is served
//! without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{Ca, write_pair};
use common::envoy::{envoy_binary, wait_ready};
use common::*;
use rcgen::ExtendedKeyUsagePurpose;

const RULES: &str = "domain: tls\ndescriptors:\n  - key: generic_key\n    value: edge\n    rate_limit: { unit: hour, requests_per_unit: 3 }\n";

/// An Envoy on a free port whose routes are rate limited by sluice over TLS; the route goes to
/// sluice's own HTTP port (`/healthz`), so no other upstream is needed. `client` is the
/// certificate Envoy presents, `trusted` the CA it trusts for sluice's.
struct TlsEnvoy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsEnvoy {
    async fn start(
        binary: &Path,
        sluice: std::net::SocketAddr,
        backend: std::net::SocketAddr,
        client: Option<&(PathBuf, PathBuf)>,
        trusted: &Path,
    ) -> TlsEnvoy {
        for _ in 0..3 {
            let (port, admin) = (free_port(), free_port());
            if let Some(envoy) =
                Self::try_start(binary, sluice, backend, client, trusted, port, admin).await
            {
                return envoy;
            }
        }
        panic!("Envoy did not start in 3 attempts");
    }

    /// One attempt; `None` when Envoy exits at start (a port found free was taken meanwhile).
    async fn try_start(
        binary: &Path,
        sluice: std::net::SocketAddr,
        backend: std::net::SocketAddr,
        client: Option<&(PathBuf, PathBuf)>,
        trusted: &Path,
        port: u16,
        admin: u16,
    ) -> Option<TlsEnvoy> {
        let certificates = match client {
            Some((cert, key)) => format!(
                "tls_certificates: [{{ certificate_chain: {{ filename: \"{}\" }}, private_key: {{ filename: \"{}\" }} }}]",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
    - name: edge
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: edge
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          route:
                            cluster: backend
                            prefix_rewrite: /healthz
                            rate_limits:
                              - actions: [{{ generic_key: {{ descriptor_value: edge }} }}]
                http_filters:
                  - name: envoy.filters.http.ratelimit
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
                      domain: tls
                      failure_mode_deny: true
                      timeout: 2s
                      rate_limit_service:
                        transport_api_version: V3
                        grpc_service: {{ envoy_grpc: {{ cluster_name: sluice }} }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: backend
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: backend
        endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend_port} }} }} }} }}] }}]
    - name: sluice
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: sluice
        endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {sluice_port} }} }} }} }}] }}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: sluice.test
          common_tls_context:
            alpn_protocols: ["h2"]
            {certificates}
            validation_context:
              trusted_ca: {{ filename: "{trusted}" }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: sluice.test }}
"#,
            backend_port = backend.port(),
            sluice_port = sluice.port(),
            trusted = trusted.display(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .args(["--disable-hot-restart", "--log-level", "warn"])
            .args(["--base-id", &free_port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let mut envoy = TlsEnvoy {
            child,
            port,
            _dir: dir,
        };
        wait_ready(&mut envoy.child, admin).await.then_some(envoy)
    }

    async fn get(&self) -> u16 {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/", self.port))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("Envoy answers")
            .status()
            .as_u16()
    }
}

impl Drop for TlsEnvoy {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A direct gRPC call over TLS, trusting `ca`, presenting `identity` if given.
async fn direct(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<(), String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .domain_name("sluice.test")
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CALL_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut client = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(channel);
    client
        .should_rate_limit(request("tls", &[&[("generic_key", "other")]]))
        .await
        .map(drop)
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn mutual_tls_with_a_real_envoy_and_rotation_without_restart() {
    let Some(envoy) = envoy_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (first_ca, next_ca) = (Ca::new("sluice ca"), Ca::new("sluice ca, rotated"));
    let first_ca_pem = first_ca.write(dir.path(), "ca.pem");
    let next_ca_pem = next_ca.write(dir.path(), "next-ca.pem");
    let (cert, key) = write_pair(
        dir.path(),
        "server",
        first_ca.issue(&["sluice.test"], ExtendedKeyUsagePurpose::ServerAuth),
    );
    let envoy_identity = write_pair(
        dir.path(),
        "envoy",
        first_ca.issue(&["envoy.mesh"], ExtendedKeyUsagePurpose::ClientAuth),
    );
    let intruder = write_pair(
        dir.path(),
        "intruder",
        first_ca.issue(&["intruder.mesh"], ExtendedKeyUsagePurpose::ClientAuth),
    );
    let (c, k, ca) = (cert.clone(), key.clone(), first_ca_pem.clone());
    let server = start_with(&[("tls.yaml", RULES)], move |s| {
        s.grpc_tls_cert = Some(c);
        s.grpc_tls_key = Some(k);
        s.grpc_client_ca = Some(ca);
        s.grpc_client_san = Some("envoy.mesh".into());
    })
    .await;
    let running = server.running.as_ref().unwrap();
    let (grpc, http) = (running.grpc_addr, running.http_addr);

    // Envoy with its client certificate: rate limited by sluice over mutual TLS.
    let edge = TlsEnvoy::start(&envoy, grpc, http, Some(&envoy_identity), &first_ca_pem).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(edge.get().await);
    }
    assert_eq!(codes, [200, 200, 200, 429, 429]);

    // Without a client certificate, or with one for another name: refused.
    let bare = TlsEnvoy::start(&envoy, grpc, http, None, &first_ca_pem).await;
    assert_eq!(
        bare.get().await,
        500,
        "failure_mode_deny: sluice refused Envoy"
    );
    assert!(direct(grpc, &first_ca_pem, None).await.is_err());
    assert!(direct(grpc, &first_ca_pem, Some(&intruder)).await.is_err());
    assert!(
        direct(grpc, &first_ca_pem, Some(&envoy_identity))
            .await
            .is_ok()
    );

    // An Envoy that trusts only the rotated CA cannot reach sluice yet...
    let rotated = TlsEnvoy::start(&envoy, grpc, http, Some(&envoy_identity), &next_ca_pem).await;
    assert_eq!(rotated.get().await, 500);
    // ...until the server certificate is rotated on disk: no restart.
    write_pair(
        dir.path(),
        "server",
        next_ca.issue(&["sluice.test"], ExtendedKeyUsagePurpose::ServerAuth),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Over the hour's 3 by now: 429 means Envoy reached sluice and was answered.
        let code = rotated.get().await;
        if code == 429 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated certificate never served: {code}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        direct(grpc, &next_ca_pem, Some(&envoy_identity))
            .await
            .is_ok()
    );
    assert!(
        direct(grpc, &first_ca_pem, Some(&envoy_identity))
            .await
            .is_err()
    );
    drop((edge, bare, rotated));
    server.stop().await;
}
