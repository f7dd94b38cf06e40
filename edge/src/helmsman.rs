//! The Helmsman adapter: MistServer posts its trigger webhooks here; each is parsed, written to
//! the write-ahead log (flushed to disk) and only then answered, and a forwarder sends the log
//! to Decklog oldest first, with retries, removing a trigger once Decklog has acknowledged it.
//! A Decklog or Kafka outage only makes the log longer.
//!
//! Routes: `POST /` (trigger type from Mist's `X-Trigger` header) or `POST /{TRIGGER}`, and
//! `GET /status` (JSON counters: received, pending, forwarded, dead, last error).
//!
//! One exception to "on disk before the answer": a blocking trigger (`USER_NEW`,
//! `PUSH_REWRITE`) whose write takes longer than 4 s is answered anyway, because Mist gives up
//! at 5 s and would then apply its own default to the viewer or publisher; the write still
//! completes and is forwarded, but a crash in that window loses it (logged as a warning).

use keel_operators::time::now_ms;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Notify;

use crate::client::DecklogClient;
use crate::mist::{Origin, answer, parse};
use crate::wal::Wal;

/// Triggers sent to Decklog per call.
const BATCH: usize = 512;
/// How long Mist may wait for the answer to a blocking trigger before it is given regardless
/// (Mist itself gives up after 5 s).
const BLOCKING_DEADLINE: Duration = Duration::from_secs(4);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the adapter is set up.
#[derive(Clone)]
pub struct AdapterConfig {
    /// This node's id, stamped on every trigger.
    pub node_id: String,
    /// The tenant of this node's triggers, when Decklog's credentials do not imply it.
    pub tenant_id: Option<String>,
    /// Decklog's URL (`http://host:port` or `https://…`).
    pub decklog_url: String,
    /// Bearer token for Decklog.
    pub token: String,
    /// Certificate authority to trust for an `https` Decklog.
    pub ca_pem: Option<Vec<u8>>,
    /// The write-ahead log directory.
    pub wal_dir: PathBuf,
}

impl std::fmt::Debug for AdapterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterConfig")
            .field("node_id", &self.node_id)
            .field("tenant_id", &self.tenant_id)
            .field("decklog_url", &self.decklog_url)
            .field("token", &"***")
            .field("wal_dir", &self.wal_dir)
            .finish_non_exhaustive()
    }
}

/// Counters shown by `GET /status`.
#[derive(Debug, Default)]
pub struct AdapterStats {
    /// Triggers written to the log.
    pub received: AtomicU64,
    /// Triggers Decklog acknowledged.
    pub forwarded: AtomicU64,
    /// Triggers Decklog refused for good (set aside as `.dead`).
    pub dead: AtomicU64,
    /// Failed forwarding attempts.
    pub retries: AtomicU64,
    last_error: Mutex<String>,
}

impl AdapterStats {
    fn failed(&self, error: String) {
        tracing::warn!(%error, "forwarding to Decklog failed; will retry");
        self.retries.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }
}

/// The adapter: the log, what waits in it, and the counters.
#[derive(Clone, Debug)]
pub struct Adapter {
    config: Arc<AdapterConfig>,
    wal: Arc<Wal>,
    pending: Arc<Mutex<BTreeSet<PathBuf>>>,
    wake: Arc<Notify>,
    nonce: Arc<AtomicU64>,
    /// Its counters.
    pub stats: Arc<AdapterStats>,
}

/// A start for the nonce that differs between runs (so a restart within the same millisecond
/// does not repeat one).
fn random_start() -> u64 {
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(std::process::id(), std::time::Instant::now()), &mut hash);
    std::hash::Hasher::finish(&hash) >> 16
}

impl Adapter {
    /// Opens the log (what an earlier run left pending is forwarded first).
    pub fn open(config: AdapterConfig) -> std::io::Result<Adapter> {
        let (wal, pending) = Wal::open(&config.wal_dir)?;
        if !pending.is_empty() {
            tracing::info!(
                pending = pending.len(),
                dir = %config.wal_dir.display(),
                "triggers left by an earlier run will be forwarded first"
            );
        }
        Ok(Adapter {
            config: Arc::new(config),
            wal: Arc::new(wal),
            pending: Arc::new(Mutex::new(pending.into_iter().collect())),
            wake: Arc::new(Notify::new()),
            nonce: Arc::new(AtomicU64::new(random_start())),
            stats: Arc::default(),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Triggers written but not yet acknowledged by Decklog.
    pub fn pending_count(&self) -> usize {
        self.pending().len()
    }

    /// Appends the adapter's counters in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP keel_helmsman_triggers_total Mist triggers the adapter logged, forwarded and set aside.\n# TYPE keel_helmsman_triggers_total counter"
        );
        for (state, value) in [
            ("received", &self.stats.received),
            ("forwarded", &self.stats.forwarded),
            ("dead", &self.stats.dead),
        ] {
            let _ = writeln!(
                out,
                "keel_helmsman_triggers_total{{state=\"{state}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keel_helmsman_forward_failures_total Failed attempts to forward to Decklog.\n# TYPE keel_helmsman_forward_failures_total counter\nkeel_helmsman_forward_failures_total {}",
            self.stats.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP keel_helmsman_pending Triggers in the log not yet acknowledged by Decklog.\n# TYPE keel_helmsman_pending gauge\nkeel_helmsman_pending {}",
            self.pending_count()
        );
    }

    /// The HTTP routes Mist posts to.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", post(root_trigger))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .route("/{trigger}", post(named_trigger))
            .with_state(self.clone())
    }

    /// Parses, logs durably and answers one webhook.
    pub async fn receive(&self, trigger_type: &str, headers: &HeaderMap, body: Bytes) -> Response {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let received_ms = now_ms();
        let origin = Origin {
            node_id: self.config.node_id.clone(),
            tenant_id: self.config.tenant_id.clone(),
            received_ms,
            trigger_uuid: header("x-trigger-uuid"),
            trigger_unix_millis: header("x-trigger-unixmillis").parse().unwrap_or(0),
            nonce: self.nonce.fetch_add(1, Ordering::Relaxed),
        };
        let trigger = parse(trigger_type, &body, &origin);
        let blocking = trigger.blocking;
        let wal = self.wal.clone();
        let this = self.clone();
        // The write and its bookkeeping finish even if the answer has gone out already.
        let mut write = tokio::spawn(async move {
            let written =
                tokio::task::spawn_blocking(move || wal.append(&trigger, received_ms)).await;
            if let Ok(Ok(path)) = &written {
                this.stats.received.fetch_add(1, Ordering::Relaxed);
                this.pending().insert(path.clone());
                this.wake.notify_one();
            }
            written
        });
        let written = if blocking {
            // Mist waits on these (5 s, then it applies its default): answer in time even if
            // the disk is slow; the trigger is still written and forwarded.
            match tokio::time::timeout(BLOCKING_DEADLINE, &mut write).await {
                Ok(written) => written,
                Err(_) => {
                    tracing::warn!(
                        trigger_type,
                        "the trigger log is slow; answered Mist before the write finished"
                    );
                    return (StatusCode::OK, answer(trigger_type, &body)).into_response();
                }
            }
        } else {
            write.await
        };
        match written {
            Ok(Ok(Ok(_))) => (StatusCode::OK, answer(trigger_type, &body)).into_response(),
            Ok(Ok(Err(error))) => {
                tracing::error!(%error, dir = %self.wal.dir().display(), "cannot write the trigger log");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot write the trigger log: {error}"),
                )
                    .into_response()
            }
            Ok(Err(error)) | Err(error) => {
                (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
            }
        }
    }

    /// Sends the log to Decklog forever, oldest first.
    pub async fn forward(self) {
        let mut client: Option<DecklogClient> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let batch: Vec<PathBuf> = self.pending().iter().take(BATCH).cloned().collect();
            if batch.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            match self.forward_batch(&mut client, &batch).await {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(error) => {
                    client = None;
                    self.stats.failed(error);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One attempt; `Ok(false)` when some triggers must be tried again.
    async fn forward_batch(
        &self,
        client: &mut Option<DecklogClient>,
        batch: &[PathBuf],
    ) -> Result<bool, String> {
        let mut triggers = Vec::with_capacity(batch.len());
        let mut files = Vec::with_capacity(batch.len());
        for path in batch {
            match Wal::read(path) {
                Ok(trigger) => {
                    triggers.push(trigger);
                    files.push(path.clone());
                }
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    self.set_aside(path, &format!("unreadable log file: {error}"));
                }
                Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
            }
        }
        if triggers.is_empty() {
            return Ok(true);
        }
        let connected = match client {
            Some(client) => client,
            None => client.insert(
                DecklogClient::connect(
                    &self.config.decklog_url,
                    &self.config.token,
                    self.config.ca_pem.as_deref(),
                )
                .await?,
            ),
        };
        let answer = connected
            .send_events(triggers)
            .await
            .map_err(|status| format!("Decklog: {}", status.message()))?;
        /// What becomes of a sent trigger's file.
        #[derive(Clone, Copy, PartialEq)]
        enum Fate {
            Delivered,
            Again,
            /// Refused for good: moved aside already, and nothing to wait for.
            SetAside,
        }
        let mut fates = vec![Fate::Delivered; files.len()];
        for rejection in &answer.rejected {
            let Some(path) = files.get(rejection.index as usize) else {
                continue;
            };
            if rejection.retryable {
                fates[rejection.index as usize] = Fate::Again;
                self.stats.failed(rejection.reason.clone());
            } else {
                fates[rejection.index as usize] = Fate::SetAside;
                self.set_aside(path, &rejection.reason);
            }
        }
        // Only triggers to send again hold the forwarder back: one set aside for good made it
        // back off as if Decklog were failing.
        let mut all = true;
        for (path, fate) in files.iter().zip(fates) {
            if fate != Fate::Delivered {
                all &= fate == Fate::SetAside;
                continue;
            }
            if let Err(error) = Wal::remove(path) {
                tracing::warn!(%error, path = %path.display(), "cannot remove a forwarded trigger");
            }
            self.pending().remove(path);
            self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        Ok(all)
    }

    fn set_aside(&self, path: &Path, reason: &str) {
        tracing::error!(path = %path.display(), reason, "Decklog refused a trigger for good; set aside");
        if let Err(error) = Wal::bury(path, reason) {
            tracing::error!(%error, path = %path.display(), "cannot set the trigger aside");
        }
        self.pending().remove(path);
        self.stats.dead.fetch_add(1, Ordering::Relaxed);
    }
}

async fn root_trigger(State(adapter): State<Adapter>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(kind) = headers
        .get("x-trigger")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_uppercase())
        .filter(|v| !v.is_empty())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "which trigger? send Mist's X-Trigger header or post to /<TRIGGER>",
        )
            .into_response();
    };
    adapter.receive(&kind, &headers, body).await
}

async fn named_trigger(
    State(adapter): State<Adapter>,
    UrlPath(kind): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    adapter
        .receive(&kind.to_ascii_uppercase(), &headers, body)
        .await
}

async fn metrics(State(adapter): State<Adapter>) -> Response {
    let mut text = String::new();
    adapter.render_metrics(&mut text);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

async fn status(State(adapter): State<Adapter>) -> Response {
    let stats = &adapter.stats;
    let last_error = stats
        .last_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    axum::Json(serde_json::json!({
        "received": stats.received.load(Ordering::Relaxed),
        "pending": adapter.pending_count(),
        "forwarded": stats.forwarded.load(Ordering::Relaxed),
        "dead": stats.dead.load(Ordering::Relaxed),
        "retries": stats.retries.load(Ordering::Relaxed),
        "last_error": last_error,
    }))
    .into_response()
}
