//! An HTTP client for aws-sdk-s3 that accepts any TLS certificate (`verify_tls = false`).
//!
//! aws-smithy-http-client has no switch to disable certificate verification and no hook for a
//! custom rustls verifier (awslabs/aws-sdk-rust#1175), so this module builds its own hyper client
//! with a rustls `ServerCertVerifier` that accepts every certificate, and adapts it to the SDK's
//! `HttpClient` trait. It deliberately implements only what ferry needs: HTTP/1.1, connect
//! timeout, no proxy support, no connection poisoning.

use std::error::Error;
use std::sync::Arc;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::ErrorKind;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The SDK's `HttpClient`, creating one hyper client per connector settings.
#[derive(Debug)]
pub(super) struct InsecureHttpClient {
    pool_idle_timeout: std::time::Duration,
    pool_max_idle_per_host: usize,
}

impl InsecureHttpClient {
    pub(super) fn new(
        pool_idle_timeout: std::time::Duration,
        pool_max_idle_per_host: usize,
    ) -> Self {
        InsecureHttpClient { pool_idle_timeout, pool_max_idle_per_host }
    }
}

impl HttpClient for InsecureHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AcceptAnyCertificate { provider: Arc::clone(&provider) });
        // Only fails when the provider supports no protocol version, which ring always does.
        let tls = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => builder
                // DANGER: every server certificate is accepted, whoever presents it. Anyone on the
                // path can impersonate the endpoint and read or change the traffic (credentials are
                // not exposed: SigV4 never sends the secret). This exists only because operators
                // ask for it (cinder's backup_s3_verify_ssl = False) on private networks with
                // self-signed certificates; ferry still verifies every object it reads.
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
            Err(error) => return SharedHttpConnector::new(Broken(error.to_string())),
        };
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(settings.connect_timeout());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .build(https);
        SharedHttpConnector::new(InsecureConnector { client })
    }
}

#[derive(Debug, Clone)]
struct InsecureConnector {
    client: Client<HttpsConnector<TcpConnector>, SdkBody>,
}

impl HttpConnector for InsecureConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = match request.try_into_http1x() {
            Ok(request) => request,
            Err(error) => {
                return HttpConnectorFuture::ready(Err(ConnectorError::user(error.into())));
            }
        };
        let future = self.client.request(request);
        HttpConnectorFuture::new(async move {
            let response = future.await.map_err(classify)?;
            HttpResponse::try_from(response.map(SdkBody::from_body_1_x))
                .map_err(|error| ConnectorError::other(error.into(), None))
        })
    }
}

/// Classifies a hyper error for the SDK's retry logic, like aws-smithy-http-client does.
fn classify(error: hyper_util::client::legacy::Error) -> ConnectorError {
    let hyper_error = find_source::<hyper::Error>(&error);
    let is_timeout = hyper_error.is_some_and(hyper::Error::is_timeout);
    let is_user = hyper_error.is_some_and(hyper::Error::is_user);
    let is_io = error.is_connect()
        || hyper_error.is_some_and(|e| e.is_closed() || e.is_canceled())
        || find_source::<std::io::Error>(&error).is_some();
    let is_incomplete = hyper_error.is_some_and(hyper::Error::is_incomplete_message);
    let boxed = Box::new(error);
    if is_timeout {
        ConnectorError::timeout(boxed)
    } else if is_user {
        ConnectorError::user(boxed)
    } else if is_io {
        ConnectorError::io(boxed)
    } else if is_incomplete {
        ConnectorError::other(boxed, Some(ErrorKind::TransientError))
    } else {
        ConnectorError::other(boxed, None)
    }
}

fn find_source<'a, E: Error + 'static>(error: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// A connector that fails every request (the TLS configuration could not be built).
#[derive(Debug)]
struct Broken(String);

impl HttpConnector for Broken {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        HttpConnectorFuture::ready(Err(ConnectorError::user(
            format!("cannot build the tls configuration: {}", self.0).into(),
        )))
    }
}

/// DANGER: a certificate verifier that accepts every certificate. Handshake signatures are still
/// checked (so the peer holds the key of the certificate it sent), which proves nothing about who
/// the peer is.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
