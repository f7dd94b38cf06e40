//! Running the HTTP API beside the engine, and the client `keel sql --url` uses.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::RecordBatch;
use axum::serve::ListenerExt;
use keel_api::auth::Auth;
use keel_api::metrics::Metrics;
use keel_api::server::{ApiState, Limits, router};
use keel_api::sql::SqlError;
use tokio::sync::oneshot;

use crate::engine::Handles;

/// The API server, running on its own small runtime.
#[derive(Debug)]
pub struct Api {
    address: SocketAddr,
    pg_address: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Api {
    /// Binds `listen` (failing at once if it cannot) and serves the API on the engine's tables.
    pub fn start(
        listen: &str,
        pg_listen: Option<&str>,
        auth: Auth,
        limits: Limits,
        handles: &Handles,
    ) -> anyhow::Result<Api> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keel-api")
            .enable_all()
            .build()?;
        // Bound with std so that start works from inside another runtime too (tests, embedders).
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let pg_listener = match pg_listen {
            Some(pg_listen) => {
                let listener = std::net::TcpListener::bind(pg_listen).with_context(|| {
                    format!("cannot listen on {pg_listen} (PostgreSQL protocol)")
                })?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let pg_address = pg_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let state = ApiState {
            tables: handles.tables.clone(),
            auth: Arc::new(auth),
            stats: handles.stats.clone(),
            metrics: Arc::new(Metrics::default()),
            hub: handles.hub.clone(),
            fleet: handles.fleet.clone(),
            foghorn: handles.foghorn.clone(),
            extra_metrics: handles.extra_metrics.clone(),
            limits,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keel-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Some(pg) = pg_listener {
                        match tokio::net::TcpListener::from_std(pg) {
                            Ok(pg) => {
                                tokio::spawn(keel_api::pg::serve(pg, state.clone()));
                            }
                            Err(error) => {
                                tracing::error!(%error, "the PostgreSQL protocol cannot use its socket");
                            }
                        }
                    }
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "the API cannot use its socket");
                            return;
                        }
                    };
                    let send_buffer = limits.send_buffer;
                    let listener = listener.tap_io(move |stream| {
                        if let Some(bytes) = send_buffer {
                            cap_send_buffer(stream, bytes);
                        }
                    });
                    let listener = keel_api::listener::Capped::new(
                        listener,
                        keel_api::listener::MAX_CONNECTIONS,
                        keel_api::listener::FIRST_REQUEST,
                    );
                    let served = axum::serve(listener, router(state))
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(error) = served {
                        tracing::error!(%error, "the API server stopped");
                    }
                });
            })?;
        Ok(Api {
            address,
            pg_address,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where the PostgreSQL protocol listens, if it is served.
    pub fn pg_address(&self) -> Option<SocketAddr> {
        self.pg_address
    }

    /// Stops serving and waits for open requests to finish.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Fixes `stream`'s kernel send buffer at `bytes` (which also turns its autotuning off).
fn cap_send_buffer(stream: &tokio::net::TcpStream, bytes: usize) {
    if let Err(error) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
        tracing::warn!(%error, bytes, "cannot cap a connection's send buffer");
    }
}

/// Runs `sql` on a Keel at `url` with `token`; results come back as Arrow IPC so they render
/// exactly as a local query's would.
pub fn remote_sql(url: &str, token: &str, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let endpoint = format!("{}/v1/sql", url.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let body = serde_json::to_vec(&serde_json::json!({ "sql": sql }))?;
    let mut response = agent
        .post(&endpoint)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Accept", "application/vnd.apache.arrow.stream")
        .header("Content-Type", "application/json")
        .send(&body[..])
        .with_context(|| format!("cannot reach {endpoint}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .with_context(|| format!("reading the answer of {endpoint}"))?;
    if status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                let error = v.get("error")?;
                Some((
                    error.get("code")?.as_str()?.to_owned(),
                    error.get("message")?.as_str()?.to_owned(),
                ))
            });
        return Err(match message {
            Some((code, message))
                if ["bad_sql", "read_only", "query_limit"].contains(&code.as_str()) =>
            {
                SqlError::Invalid(message).into()
            }
            Some((code, message)) => {
                anyhow::anyhow!("{endpoint} answered {status} {code}: {message}")
            }
            None => anyhow::anyhow!("{endpoint} answered {status}"),
        });
    }
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .context("the answer is not an Arrow stream")?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .context("the answer is not an Arrow stream")
}
