//! A Decklog client: the Helmsman adapter's forwarder and `keel loadgen` use it.

use std::time::Duration;

use tonic::Status;
use tonic::client::Grpc;
use tonic::codegen::http;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_prost::ProstCodec;

use crate::decklog::{CHECK_HEALTH, SEND_EVENT, SEND_EVENTS};
use crate::proto::{Empty, HealthRequest, HealthResponse, MistTrigger, SendEventsResponse};

/// A connection to one Decklog.
#[derive(Debug, Clone)]
pub struct DecklogClient {
    grpc: Grpc<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl DecklogClient {
    /// Connects to `url` (`http://host:port`, or `https://…` with `ca_pem` the certificate
    /// authority to trust) sending `token` with every call.
    pub async fn connect(url: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        // Bounded waits, and keepalives that notice a half-open connection, so a forwarder
        // never hangs on a Decklog that went away.
        let mut endpoint = Channel::from_shared(url.to_owned())
            .map_err(|e| format!("bad Decklog URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(ca) = ca_pem {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .map_err(|e| format!("bad TLS settings for {url}: {e}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to Decklog at {url}: {e}"))?;
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
        Ok(DecklogClient {
            grpc: Grpc::new(channel),
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("Decklog is not ready: {e}")))
    }

    /// `SendEvent`: one trigger, answered once it is durable.
    pub async fn send_event(&mut self, trigger: MistTrigger) -> Result<(), Status> {
        self.ready().await?;
        let request = self.request(trigger);
        self.grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(SEND_EVENT),
                ProstCodec::<MistTrigger, Empty>::default(),
            )
            .await
            .map(drop)
    }

    /// `SendEvents`: a batch, answered once for all.
    pub async fn send_events(
        &mut self,
        triggers: Vec<MistTrigger>,
    ) -> Result<SendEventsResponse, Status> {
        self.ready().await?;
        let request = self.request(futures_util::stream::iter(triggers));
        self.grpc
            .client_streaming(
                request,
                http::uri::PathAndQuery::from_static(SEND_EVENTS),
                ProstCodec::<MistTrigger, SendEventsResponse>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
    }

    /// `CheckHealth` (needs no token).
    pub async fn check_health(&mut self) -> Result<HealthResponse, Status> {
        self.ready().await?;
        self.grpc
            .unary(
                tonic::Request::new(HealthRequest {}),
                http::uri::PathAndQuery::from_static(CHECK_HEALTH),
                ProstCodec::<HealthRequest, HealthResponse>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
    }
}
