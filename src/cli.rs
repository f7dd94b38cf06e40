//! The command-line interface.

use keel_operators::time::now_ms;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use keel_api::format::{Format, render};
use keel_api::sql::SqlError;
use keel_operators::time::parse_rfc3339;
use keel_sources::file::FileSource;
use keel_sources::kafka::{KafkaAddress, KafkaMode, KafkaSource, KafkaWriter};
use keel_sources::simulate::{SimConfig, SimSource, Simulator, Wire, headers, write_kcat_line};
use keel_sources::source::Source;

use crate::engine::{self, EngineOptions, Handles};
use crate::reconcile::Coverage;
use crate::summary::{Snapshot, group};

/// Keel: incremental stream processing for FrameWorks live-video analytics.
#[derive(Debug, Parser)]
#[command(name = "keel", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine and print a live summary until Ctrl-C (default source: the simulator).
    Run(Box<RunArgs>),
    /// Write simulated events to an NDJSON file (as `kcat -J` prints them) or a Kafka topic.
    Simulate(SimulateArgs),
    /// Replay events through the dataflows, then answer one SQL query over the tables.
    Sql(SqlArgs),
    /// Print the GraphQL schema (SDL) that `/graphql` serves.
    GraphqlSchema,
    /// Serve the Decklog gRPC ingest, handing accepted events to Kafka.
    Decklog(DecklogArgs),
    /// Serve the Helmsman adapter: MistServer trigger webhooks in, to Decklog, nothing lost.
    Helmsman(HelmsmanArgs),
    /// Drive Decklog (or the adapter, or Kafka itself) with generated viewer events and report
    /// acknowledged events/s and ack latency.
    Loadgen(LoadgenArgs),
    /// Create the ClickHouse database and tables, and `stream_analytics`, that `keel run` and
    /// `keel backfill` write.
    Migrate(crate::store::StoreArgs),
    /// Replay a time range of past events (Kafka or a file) through the dataflows into
    /// ClickHouse and/or `stream_analytics`, with progress; running it again changes nothing.
    Backfill(Box<crate::backfill::BackfillArgs>),
    /// The Privateer mesh: join tokens and nodes, the control plane's API, and a node's join,
    /// status and DNS.
    Mesh(crate::mesh::MeshArgs),
}

/// TLS for Decklog.
#[derive(Clone, Debug, Args)]
struct DecklogTlsArgs {
    /// Decklog's certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Decklog's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Decklog without TLS (development only: tokens cross the network in the clear).
    #[arg(long)]
    insecure_plaintext: bool,
}

impl DecklogTlsArgs {
    fn tls(&self) -> anyhow::Result<Option<keel_edge::decklog::Tls>> {
        crate::edge::tls_choice(
            self.tls_cert.as_ref(),
            self.tls_key.as_ref(),
            self.insecure_plaintext,
        )
    }
}

#[derive(Debug, Args)]
struct DecklogArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18006")]
    listen: String,
    /// Where accepted events go: `kafka://HOST:PORT/TOPIC`.
    #[arg(long)]
    kafka: String,
    /// Where `/metrics` (Prometheus) and `/healthz` are served; `off` serves none.
    #[arg(long, default_value = "127.0.0.1:18016")]
    metrics_listen: String,
    /// Seconds Kafka has to acknowledge an event before the producer is told to retry.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    kafka_timeout: f64,
    /// Shared secret for bearer JWTs (HS256).
    #[arg(long, env = "KEEL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A TOML file whose `[[api.tokens]]` are the service tokens (admin = a platform service
    /// naming each event's tenant; otherwise the token's tenant).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    tls: DecklogTlsArgs,
}

#[derive(Debug, Args)]
struct HelmsmanArgs {
    /// Address MistServer posts trigger webhooks to.
    #[arg(long, default_value = "127.0.0.1:18007")]
    listen: String,
    /// Decklog's URL (`https://…` for TLS).
    #[arg(long, default_value = "http://127.0.0.1:18006")]
    decklog: String,
    /// Bearer token for Decklog.
    #[arg(long, env = "KEEL_DECKLOG_TOKEN", hide_env_values = true)]
    token: String,
    /// Certificate authority to trust for an `https` Decklog (PEM).
    #[arg(long)]
    decklog_ca: Option<PathBuf>,
    /// This node's id, stamped on every trigger.
    #[arg(long)]
    node_id: String,
    /// The tenant of this node's triggers (needed when the token is a platform token).
    #[arg(long)]
    tenant: Option<uuid::Uuid>,
    /// The write-ahead log directory (kept across restarts: what is in it is forwarded first).
    #[arg(long, default_value = "keel-helmsman-wal")]
    wal: PathBuf,
}

#[derive(Debug, Args)]
#[group(id = "target", required = true, multiple = false)]
struct LoadgenTarget {
    /// Decklog's URL.
    #[arg(long, group = "target")]
    decklog: Option<String>,
    /// The Helmsman adapter's URL (Mist webhooks, one per event).
    #[arg(long, group = "target")]
    webhook: Option<String>,
    /// `kafka://HOST:PORT/TOPIC`: the same records straight to the broker, with Decklog's
    /// producer settings (the ceiling for Decklog's rate).
    #[arg(long, group = "target")]
    kafka: Option<String>,
}

#[derive(Debug, Args)]
struct LoadgenArgs {
    #[command(flatten)]
    target: LoadgenTarget,
    /// Bearer token for Decklog.
    #[arg(
        long,
        env = "KEEL_DECKLOG_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    /// Certificate authority for an `https` Decklog (PEM).
    #[arg(long)]
    decklog_ca: Option<PathBuf>,
    /// Events in all.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per second in all; 0 sends as fast as they are acknowledged.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Events per call (1 uses `SendEvent`, more the `SendEvents` stream).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Tenant named in every event.
    #[arg(long, default_value = "5eed517e-ba5e-da7a-517e-ba5eda7a0001")]
    tenant: uuid::Uuid,
    /// Seed of the event ids (the same seed sends the same events again).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Which wire version the simulator writes.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum WireArg {
    V1,
    V2,
}

/// How the simulated fleet looks.
#[derive(Clone, Debug, Args)]
struct FleetArgs {
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Wire version of the records.
    #[arg(long, value_enum, default_value = "v2")]
    wire: WireArg,
    /// Extra malformed records per good record (0.01 = one in a hundred).
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Tenants.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    tenants: usize,
    /// Edge nodes.
    #[arg(long, default_value_t = 12, value_parser = at_least_one)]
    nodes: usize,
    /// Streams.
    #[arg(long, default_value_t = 40, value_parser = at_least_one)]
    streams: usize,
    /// Viewer arrivals per simulated second, at most a million (default: 50, or what `--rate`
    /// implies).
    #[arg(long, value_parser = |text: &str| per_second(text, 1e6))]
    arrivals: Option<f64>,
    /// Mean viewing session, seconds (at most a day).
    #[arg(long, default_value_t = 240.0, value_parser = |text: &str| bounded(text, 86_400.0, "seconds"))]
    mean_session: f64,
    /// Simulated start time, RFC 3339 (default: 2026-11-01T00:00:00Z; `keel run`: now).
    #[arg(long)]
    start: Option<String>,
}

impl FleetArgs {
    fn config(&self, default_start: i64, rate: Option<f64>) -> anyhow::Result<SimConfig> {
        let start = match &self.start {
            Some(text) => parse_rfc3339(text)
                .with_context(|| format!("--start {text:?} is not an RFC 3339 time"))?,
            None => default_start,
        };
        // Events before 2000 are refused as implausible, and times past 2200 would leave the
        // range timestamps are written in as the simulation runs on.
        let earliest = keel_sources::codec::TimeBounds::default().earliest;
        let latest = parse_rfc3339("2200-01-01T00:00:00Z").expect("a valid time");
        if !(earliest..latest).contains(&start) {
            bail!("--start must be from 2000-01-01 and before 2200-01-01");
        }
        if !(0.0..=1.0).contains(&self.malformed) {
            bail!(
                "--malformed must be between 0 and 1, not {}",
                self.malformed
            );
        }
        // At a set rate, choose arrivals so simulated time keeps pace with the clock: each
        // arrival makes about three records, and every stream and node reports every 10 s.
        let arrivals = self.arrivals.unwrap_or_else(|| match rate {
            Some(rate) => ((rate - (self.streams + self.nodes) as f64 / 10.0) / 3.0).max(0.1),
            None => 50.0,
        });
        Ok(SimConfig {
            seed: self.seed,
            wire: match self.wire {
                WireArg::V1 => Wire::V1,
                WireArg::V2 => Wire::V2,
            },
            tenants: self.tenants,
            nodes: self.nodes,
            streams: self.streams,
            arrivals_per_second: arrivals,
            mean_session_s: self.mean_session,
            malformed: self.malformed,
            start,
            ..SimConfig::default()
        })
    }
}

/// Engine settings shared by `run` and `sql`.
#[derive(Clone, Debug, Args)]
struct EngineArgs {
    /// Timely worker threads.
    #[arg(long, short = 'w', default_value_t = 1, value_parser = at_least_one)]
    workers: usize,
    /// Most records per worker per epoch [default: 8192 for `run`, 65536 for `sql`, which
    /// replays to the end before it answers].
    #[arg(long, value_parser = at_least_one)]
    batch: Option<usize>,
}

/// Reads a count that must be at least 1 (workers, records per epoch, the simulated fleet's
/// tenants, nodes and streams): 0 is refused while the arguments are read, with the flag it
/// was given to.
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl EngineArgs {
    /// The engine's options, with `batch` records per epoch unless `--batch` says otherwise,
    /// and the records a worker may hold unstored bounded whatever the epoch size
    /// ([`EngineOptions::with_batch`]).
    /// (Both counts were checked while the arguments were read.)
    fn options(&self, batch: usize) -> EngineOptions {
        EngineOptions {
            workers: self.workers,
            ..EngineOptions::default()
        }
        .with_batch(self.batch.unwrap_or(batch))
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where events come from: `sim`, `file:PATH` or `kafka://HOST:PORT/TOPIC`.
    #[arg(long, default_value = "sim")]
    source: String,
    /// Simulator records per second (at most a billion).
    #[arg(long, default_value_t = 1000.0, value_parser = |text: &str| per_second(text, 1e9))]
    rate: f64,
    /// Kafka consumer group.
    #[arg(long, default_value = "keel-periscope")]
    group: String,
    /// How far back a Kafka source reads at start to rebuild the state (`24h`, `90m`, `7d`,
    /// `all` for the whole topic, `none` to resume at the committed positions with empty state).
    #[arg(long, default_value = "24h", value_parser = parse_horizon)]
    state_horizon: Horizon,
    /// Seconds between summary lines.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    summary_every: f64,
    /// Address the HTTP API listens on (default 127.0.0.1:8080, or the config file's).
    #[arg(long)]
    listen: Option<String>,
    /// Address the PostgreSQL protocol listens on, for psql and Grafana (default
    /// 127.0.0.1:5433, or the config file's); `off` serves none.
    #[arg(long)]
    pg_listen: Option<String>,
    /// Where Foghorn's MistServer-compatible load balancer listens (default 127.0.0.1:18008,
    /// or the config file's); `off` serves none.
    #[arg(long)]
    foghorn_listen: Option<String>,
    /// Where Foghorn's gRPC `Route` listens (default 127.0.0.1:18019, or the config file's);
    /// `off` serves none.
    #[arg(long)]
    foghorn_grpc_listen: Option<String>,
    /// Serve the mesh control plane (as `keel mesh serve` does) here too; off by default. Its
    /// state is in `keel-mesh` (or `KEEL_MESH_DIR`), the URL and WireGuard endpoint its tokens
    /// name come from `KEEL_MESH_CONTROL_URL` and `KEEL_MESH_ENDPOINT`; the API's admin tokens
    /// manage it.
    #[arg(long)]
    mesh_listen: Option<String>,
    /// A GeoIP database (MaxMind DB format, e.g. GeoLite2-City.mmdb) that places clients whose
    /// requests carry no coordinates, by their address.
    #[arg(long)]
    geoip_mmdb: Option<PathBuf>,
    /// Shared secret for bearer JWTs (HS256). Without one (here or in the config file) a
    /// development secret is generated and a tenant and an admin token are printed.
    #[arg(long, env = "KEEL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A TOML file with API settings and static tokens (see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve the Decklog gRPC ingest here (off by default); accepted events go into this
    /// engine, or to the topic of a `kafka://` source.
    #[arg(long)]
    decklog_listen: Option<String>,
    #[command(flatten)]
    decklog_tls: DecklogTlsArgs,
    /// Serve the Helmsman adapter (MistServer trigger webhooks) here, forwarding to this run's
    /// Decklog (needs --decklog-listen).
    #[arg(long, requires = "decklog_listen")]
    helmsman_listen: Option<String>,
    /// The adapter's write-ahead log directory.
    #[arg(long, default_value = "keel-helmsman-wal")]
    helmsman_wal: PathBuf,
    /// The node id the adapter stamps on triggers.
    #[arg(long, default_value = "keel-local")]
    helmsman_node: String,
    /// The tenant of the adapter's triggers (default: the first simulated tenant, the printed
    /// development tenant).
    #[arg(long)]
    helmsman_tenant: Option<uuid::Uuid>,
    #[command(flatten)]
    store: crate::store::StoreArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

/// File formats `keel simulate` writes.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SimFormat {
    /// One `kcat -J` envelope per line (topic, partition, offset, headers, key, payload).
    Kcat,
    /// One bare record value per line.
    Values,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// How many records to write (malformed ones included).
    #[arg(long)]
    events: u64,
    /// An NDJSON file, `-` for standard output, or `kafka://HOST:PORT/TOPIC` to produce to a
    /// topic.
    #[arg(long)]
    out: String,
    /// File format.
    #[arg(long, value_enum, default_value = "kcat")]
    format: SimFormat,
    /// Topic named in `kcat` lines.
    #[arg(long, default_value = "analytics_events")]
    topic: String,
    /// Partitions the event ids are spread over in `kcat` lines.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[command(flatten)]
    fleet: FleetArgs,
}

/// Output formats of `keel sql`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
struct SqlArgs {
    /// The query.
    sql: String,
    /// An NDJSON file to replay (same as `--source file:PATH`); `-` reads standard input.
    #[arg(long, conflicts_with = "source")]
    input: Option<PathBuf>,
    /// Where events come from: `file:PATH`, `kafka://HOST:PORT/TOPIC` (read once, from the
    /// beginning), or `sim` (with `--events`).
    #[arg(long)]
    source: Option<String>,
    /// Records to simulate with `--source sim`.
    #[arg(long)]
    events: Option<u64>,
    /// Seconds of silence that end a Kafka replay.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    idle: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: FormatArg,
    /// Ask a running Keel instead of replaying events (for example http://127.0.0.1:8080).
    #[arg(long, conflicts_with_all = ["input", "source", "workers", "batch"])]
    url: Option<String>,
    /// Bearer token for `--url`.
    #[arg(long, env = "KEEL_TOKEN", hide_env_values = true, requires = "url")]
    token: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

impl RunArgs {
    fn engine_options(&self) -> EngineOptions {
        self.engine.options(EngineOptions::default().batch)
    }
}

impl SqlArgs {
    fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            // The replay answers one query once it has read everything, and routes no viewer.
            routing: false,
            ..self.engine.options(engine::REPLAY_BATCH)
        }
    }
}

fn default_start() -> i64 {
    parse_rfc3339("2026-11-01T00:00:00Z").expect("a valid constant")
}

/// The simulated fleet's options that shape its records only.
const RECORD_SHAPE: &[&str] = &[
    "wire",
    "malformed",
    "nodes",
    "streams",
    "arrivals",
    "mean_session",
    "start",
];

/// The fleet's other options, which also choose the tenants `keel run` prints tokens for,
/// whatever the source.
const FLEET_TENANTS: &[&str] = &["seed", "tenants"];

/// Options given on the command line that do nothing with the rest of it, said by name, so
/// that none is ignored silently: a `--rate` that did not pace a file replay, or a `--group`
/// that no Kafka member used, would only look like a fault elsewhere.
fn inapplicable(matches: &ArgMatches) -> Option<String> {
    let given = |matches: &ArgMatches, ids: &[&str]| -> Vec<String> {
        ids.iter()
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect()
    };
    // Refuses the options `ids` given in `matches` unless they apply; `of` names whose options
    // they are ("an option of the simulator"), `context` what they were given with.
    let unless = |applies: bool, matches: &ArgMatches, ids: &[&str], of: &str, context: &str| {
        let flags = given(matches, ids);
        if applies || flags.is_empty() {
            return None;
        }
        let (is, does, them) = match flags.len() {
            1 => ("is an option", "does", "it"),
            _ => ("are options", "do", "them"),
        };
        let named = match flags.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => flags.join(""),
        };
        Some(format!(
            "{named} {is} of {of}, and {does} nothing {context}: leave {them} out"
        ))
    };
    let is_kafka = |spec: &str| spec.starts_with("kafka://");
    const SIMULATOR: &str = "the simulator";
    const KAFKA: &str = "a kafka:// source";
    match matches.subcommand()? {
        ("run", run) => {
            let source = run.get_one::<String>("source")?;
            let context = format!("with --source {source}");
            let ids = [&["rate"][..], RECORD_SHAPE].concat();
            unless(is_simulator(source), run, &ids, SIMULATOR, &context).or_else(|| {
                let ids = ["group", "state_horizon"];
                unless(is_kafka(source), run, &ids, KAFKA, &context)
            })
        }
        ("sql", sql) => {
            let fleet = [FLEET_TENANTS, RECORD_SHAPE].concat();
            if sql.get_one::<String>("url").is_some() {
                let ids = [&fleet[..], &["events", "idle"]].concat();
                let context = "with --url, which asks a running engine";
                return unless(false, sql, &ids, "a replay", context);
            }
            let spec = sql.get_one::<String>("source").map_or("", String::as_str);
            let context = match sql.get_one::<PathBuf>("input") {
                Some(path) => format!("with --input {}", path.display()),
                // Without either, `sql` says where events may come from.
                None if spec.is_empty() => return None,
                None => format!("with --source {spec}"),
            };
            unless(is_simulator(spec), sql, &fleet, SIMULATOR, &context)
                .or_else(|| unless(is_kafka(spec), sql, &["idle"], KAFKA, &context))
        }
        ("backfill", backfill) => {
            let source = backfill.get_one::<String>("source")?;
            let context = format!("with --source {source}");
            unless(is_kafka(source), backfill, &["idle"], KAFKA, &context)
        }
        _ => None,
    }
}

/// Whether a source's command-line spelling names the simulator.
fn is_simulator(spec: &str) -> bool {
    spec == "sim" || spec == "simulator"
}

/// Opens a source from its command-line spelling.
fn open_source(
    spec: &str,
    kafka_mode: KafkaMode,
    sim: impl FnOnce() -> anyhow::Result<SimSource>,
) -> anyhow::Result<Arc<dyn Source>> {
    if is_simulator(spec) {
        Ok(Arc::new(sim()?))
    } else if let Some(path) = spec.strip_prefix("file:") {
        Ok(Arc::new(FileSource::open(path.as_ref())?))
    } else if spec.starts_with("kafka://") {
        Ok(Arc::new(KafkaSource::new(
            KafkaAddress::parse(spec)?,
            kafka_mode,
        )))
    } else {
        bail!("unknown source {spec:?}: use sim, file:PATH or kafka://HOST:PORT/TOPIC")
    }
}

/// Runs the engine on a thread; calls `tick` every `every` until it finishes.
pub(crate) fn run_engine(
    source: Arc<dyn Source>,
    options: &EngineOptions,
    handles: &Handles,
    every: Duration,
    mut tick: impl FnMut(Duration),
) -> anyhow::Result<()> {
    let engine = {
        let (options, handles) = (options.clone(), handles.clone());
        std::thread::Builder::new()
            .name("keel-engine".into())
            .spawn(move || engine::run(source, &options, &handles))?
    };
    let started = Instant::now();
    while !engine.is_finished() {
        let deadline = Instant::now() + every;
        while !engine.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20).min(every));
        }
        if !engine.is_finished() {
            tick(started.elapsed());
        }
    }
    engine
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?
}

/// How far back a live Kafka source reads at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Horizon {
    None,
    Back(Duration),
}

/// What a state rebuilt from the last `horizon` speaks for: everything of its streams when the
/// horizon reaches past any record (`all`); nothing otherwise, since sessions that began before
/// a shorter horizon and are still open are missing from it.
fn horizon_coverage(horizon: Duration) -> Option<Coverage> {
    (horizon >= WHOLE_TOPIC).then_some(Coverage::ALL)
}

/// `--state-horizon all`: older than any record a broker holds.
const WHOLE_TOPIC: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A number of seconds an option takes: positive, finite and at most [`MAX_SECONDS`] (a
/// `Duration` cannot hold infinity, and a wait of centuries is a typo).
pub(crate) fn seconds(text: &str) -> Result<f64, String> {
    bounded(text, MAX_SECONDS, "seconds")
}

/// The longest wait an option may give: a year.
const MAX_SECONDS: f64 = 365.0 * 86_400.0;

/// A rate an option takes: positive, finite and at most `most` per second.
fn per_second(text: &str, most: f64) -> Result<f64, String> {
    bounded(text, most, "per second")
}

fn bounded(text: &str, most: f64, unit: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n <= most => Ok(n),
        Ok(_) => Err(format!("must be more than 0 and at most {most} ({unit})")),
        Err(_) => Err(format!("{text:?} is not a number ({unit})")),
    }
}

fn parse_horizon(text: &str) -> Result<Horizon, String> {
    match text {
        "none" => Ok(Horizon::None),
        "all" => Ok(Horizon::Back(WHOLE_TOPIC)),
        _ => parse_duration(text).map(Horizon::Back),
    }
}

/// A duration written as a whole number with a unit: `90s`, `15m`, `24h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: use s, m, h or d (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 24h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let mut options = args.engine_options();
    let config = args.fleet.config(now_ms(), Some(args.rate))?;
    let settings = match &args.config {
        Some(path) => crate::config::Config::load(path)?,
        None => crate::config::Config::default(),
    };
    let fleet_tenants = Simulator::new(config.clone()).tenants();
    let source: Arc<dyn Source> = if args.source.starts_with("kafka://") {
        let kafka = KafkaSource::new(
            KafkaAddress::parse(&args.source)?,
            KafkaMode::Live {
                group: args.group.clone(),
            },
        );
        // A state rebuilt from the whole topic speaks for every stored row of its streams
        // (see `reconcile`).
        options.reconcile = match args.state_horizon {
            Horizon::None => None,
            Horizon::Back(horizon) => horizon_coverage(horizon),
        };
        Arc::new(match args.state_horizon {
            Horizon::None => kafka,
            Horizon::Back(horizon) => kafka.with_state_horizon(horizon),
        })
    } else {
        open_source(
            &args.source,
            KafkaMode::Replay {
                idle: Duration::ZERO,
            },
            || Ok(SimSource::new(config, None, Some(args.rate))),
        )?
    };
    let durable = args.store.start(
        is_simulator(&args.source).then_some(crate::store::DEFAULT_SQLITE),
        &args.source,
    )?;
    let handles = Handles {
        durable: durable.clone(),
        ..Handles::default()
    };
    if let Some(durable) = &durable {
        let stats = durable.stats();
        handles.extra_metrics.add(move |out| stats.render(out));
    }
    let listen = args
        .listen
        .clone()
        .or(settings.api.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let secret = args.jwt_secret.clone().or(settings.api.jwt_secret.clone());
    let generated = secret.is_none();
    let secret = secret.unwrap_or_else(|| {
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    });
    let limits = settings.api.limits()?;
    let pg_listen = args
        .pg_listen
        .clone()
        .or(settings.api.pg_listen.clone())
        .unwrap_or_else(|| "127.0.0.1:5433".to_owned());
    let pg_listen = (pg_listen != "off").then_some(pg_listen);
    let auth = keel_api::auth::Auth::new(Some(secret), settings.api.tokens)
        .map_err(|problems| anyhow::anyhow!("API settings: {problems}"))?;
    let api = crate::serve::Api::start(
        &listen,
        pg_listen.as_deref(),
        auth.clone(),
        limits,
        &handles,
    )?;
    handles.fleet.set_policy(settings.foghorn.policy()?);
    let foghorn_listen = args
        .foghorn_listen
        .clone()
        .or(settings.foghorn.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:18008".to_owned());
    let foghorn_grpc = args
        .foghorn_grpc_listen
        .clone()
        .or(settings.foghorn.grpc_listen.clone())
        .unwrap_or_else(|| "127.0.0.1:18019".to_owned());
    let foghorn_grpc = (foghorn_grpc != "off").then_some(foghorn_grpc);
    let foghorn = if foghorn_listen == "off" {
        None
    } else {
        let geoip = args
            .geoip_mmdb
            .clone()
            .or(settings.foghorn.geoip_mmdb.clone());
        Some(crate::foghorn::FoghornServer::start(
            &foghorn_listen,
            foghorn_grpc.as_deref(),
            geoip.as_deref(),
            Some(auth.clone()),
            settings.foghorn.client_limit()?,
            &handles,
        )?)
    };
    let edge = start_edge(args, &auth, &handles, &fleet_tenants)?;
    if let Some(edge) = &edge {
        handles.extra_metrics.add(edge.metrics());
    }
    let mesh = args
        .mesh_listen
        .as_deref()
        .map(|listen| crate::mesh::start_control_plane(listen, auth.clone()))
        .transpose()?;
    let shutdown = handles.shutdown.clone();
    ctrlc::set_handler(move || {
        if shutdown.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping: finishing the epochs in flight (Ctrl-C again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    eprintln!(
        "keel: {} on {} worker(s); Ctrl-C stops",
        source.describe(),
        options.workers
    );
    eprintln!("keel: dashboard and API on http://{}", api.address());
    if let Some(pg) = api.pg_address() {
        eprintln!("keel: PostgreSQL protocol on {pg} (password: a token)");
    }
    if let Some(foghorn) = &foghorn {
        match foghorn.grpc_address() {
            Some(grpc) => eprintln!(
                "keel: Foghorn routing on http://{} (gRPC on {grpc})",
                foghorn.address()
            ),
            None => eprintln!("keel: Foghorn routing on http://{}", foghorn.address()),
        }
    }
    if let Some(mesh) = mesh {
        eprintln!("keel: mesh control plane on http://{mesh}");
    }
    if let Some(edge) = &edge {
        if let Some(address) = edge.decklog_address() {
            eprintln!(
                "keel: Decklog on {}://{address}, events to {}",
                if args.decklog_tls.insecure_plaintext {
                    "http"
                } else {
                    "https"
                },
                edge.handoff().map_or_else(String::new, |h| h.describe())
            );
        }
        if let Some(address) = edge.helmsman_address() {
            eprintln!(
                "keel: Helmsman adapter on http://{address} (trigger log in {})",
                args.helmsman_wal.display()
            );
        }
    }
    if generated {
        let expires = now_ms() / 1000 + 24 * 3600;
        let tenant = fleet_tenants
            .first()
            .and_then(|t| uuid::Uuid::parse_str(t).ok())
            .unwrap_or_else(uuid::Uuid::new_v4);
        let member = auth
            .issue(&keel_api::auth::Claims::member("dev", tenant, expires))
            .expect("a secret is set");
        let admin = auth
            .issue(&keel_api::auth::Claims::admin("dev-admin", expires))
            .expect("a secret is set");
        eprintln!("keel: development tokens, valid 24 h (pass --jwt-secret to use your own):");
        if !is_simulator(&args.source) {
            // The tenants of a file or topic are not known yet: the tenant token is the
            // simulated fleet's, which such a source may not hold at all.
            eprintln!(
                "  (the tenant below is the simulator's; this source's tenants are seen with \
                 the admin token, e.g. SELECT DISTINCT tenant_id FROM streams, and need \
                 --jwt-secret for tokens of their own)"
            );
        }
        eprintln!("  tenant {tenant}: {member}");
        eprintln!("  admin: {admin}");
    }
    if let Some(clickhouse) = durable.as_ref().and_then(|d| d.clickhouse()) {
        eprintln!(
            "keel: tables stored in ClickHouse {} at {}, database {}",
            clickhouse.version(),
            clickhouse.url(),
            clickhouse.database()
        );
    }
    if let Some(topic) = durable.as_ref().and_then(|d| d.dead_letter_topic()) {
        eprintln!("keel: records that cannot be used are copied to topic {topic}");
    }
    if durable.as_ref().is_some_and(|d| d.sql().is_some()) {
        let url = args
            .store
            .database
            .as_deref()
            .unwrap_or(crate::store::DEFAULT_SQLITE);
        eprintln!(
            "keel: stream_analytics stored in {}",
            crate::store::redact(url)
        );
    }
    let every = Duration::from_secs_f64(args.summary_every.max(0.05));
    let mut previous = Snapshot::default();
    let snapshot = |handles: &Handles| {
        let tables = handles
            .tables
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Snapshot::take(&handles.stats, &tables)
    };
    let mut last = Duration::ZERO;
    let mut printing = true;
    run_engine(source, &options, &handles, every, |elapsed| {
        let now = snapshot(&handles);
        let mut line = now.line(&previous, elapsed, elapsed - last);
        // A store that keeps refusing is retried with backoff for good: said on every line
        // until a write succeeds, not only in a log.
        if let Some(durable) = &durable {
            let stats = durable.stats();
            if let Some(error) = stats.last_error.lock().as_deref() {
                let error: String = error.chars().take(160).collect();
                line.push_str(&format!(
                    " | stores failing ({} rows waiting): {error}",
                    group(stats.pending_rows.load(Ordering::Relaxed))
                ));
            }
        }
        // Standard output closed under it (`keel run | head`): stopped as Ctrl-C stops it,
        // with the epochs in flight finished, rather than by a panic.
        if printing && writeln!(std::io::stdout(), "{line}").is_err() {
            printing = false;
            if !handles.shutdown.swap(true, Ordering::SeqCst) {
                eprintln!("\nstopping: standard output is closed");
            }
        }
        previous = now;
        last = elapsed;
    })?;
    if let Some(durable) = &durable
        && !durable.finish(Duration::from_secs(30))
    {
        eprintln!(
            "keel: the stores did not take the last epochs; their positions are not committed and \
             the next run reads them again"
        );
    }
    let now = snapshot(&handles);
    if printing {
        let _ = writeln!(std::io::stdout(), "stopped: {}", now.totals());
    }
    Ok(())
}

/// Starts Decklog (and the adapter) for `keel run`, when asked for.
fn start_edge(
    args: &RunArgs,
    auth: &keel_api::auth::Auth,
    handles: &Handles,
    fleet_tenants: &[String],
) -> anyhow::Result<Option<crate::edge::EdgeServer>> {
    let Some(listen) = &args.decklog_listen else {
        return Ok(None);
    };
    let tls = args.decklog_tls.tls()?;
    let handoff = if args.source.starts_with("kafka://") {
        let address = KafkaAddress::parse(&args.source)?;
        keel_edge::handoff::Handoff::kafka(
            &address.brokers,
            &address.topic,
            Duration::from_secs(10),
        )
        .map_err(anyhow::Error::msg)?
    } else {
        keel_edge::handoff::Handoff::engine(handles.injector.clone())
    };
    let helmsman = match &args.helmsman_listen {
        None => None,
        Some(helmsman_listen) => {
            // The adapter talks to this run's Decklog as a member of its tenant, so the
            // tenant of its triggers comes from its credentials.
            let tenant = args
                .helmsman_tenant
                .or_else(|| {
                    fleet_tenants
                        .first()
                        .and_then(|t| uuid::Uuid::parse_str(t).ok())
                })
                .context("the adapter needs a tenant: pass --helmsman-tenant")?;
            let token = auth
                .issue(&keel_api::auth::Claims::member(
                    "helmsman-adapter",
                    tenant,
                    now_ms() / 1000 + 365 * 24 * 3600,
                ))
                .context("the adapter needs a JWT secret to call Decklog")?;
            let ca_pem = args
                .decklog_tls
                .tls_cert
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
                .transpose()?;
            Some(crate::edge::HelmsmanSettings {
                listen: helmsman_listen.clone(),
                adapter: keel_edge::helmsman::AdapterConfig {
                    node_id: args.helmsman_node.clone(),
                    tenant_id: Some(tenant.to_string()),
                    decklog_url: String::new(),
                    token,
                    ca_pem,
                    wal_dir: args.helmsman_wal.clone(),
                },
            })
        }
    };
    crate::edge::EdgeServer::start(
        Some(crate::edge::DecklogSettings {
            listen: listen.clone(),
            tls,
            handoff,
            auth: auth.clone(),
            metrics_listen: None,
        }),
        helmsman,
    )
    .map(Some)
}

fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let config = args.fleet.config(default_start(), None)?;
    let mut simulator = Simulator::new(config);
    let mut value = Vec::new();
    let started = Instant::now();
    let mut shown = Instant::now();
    let progress = std::io::stderr().is_terminal() || args.events >= 1_000_000;
    let mut report = |done: u64, force: bool| {
        if progress && (force || shown.elapsed() >= Duration::from_secs(1)) {
            shown = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let left = (args.events - done) as f64 / rate.max(1.0);
            eprintln!(
                "simulate: {} / {} records ({} /s, about {:.0} s left)",
                group(done),
                group(args.events),
                group(rate as u64),
                left
            );
        }
    };
    if args.out.starts_with("kafka://") {
        let writer = KafkaWriter::new(&KafkaAddress::parse(&args.out)?)?;
        for done in 0..args.events {
            value.clear();
            let record = simulator.next_record(&mut value);
            // Stamped with the event's time, as the platform's producers stamp records when
            // they send them, so positions by time (recovery, backfill) find simulated history.
            writer.send_stamped(
                &record.event_id,
                &value,
                &headers(&record),
                Some(record.time),
            )?;
            report(done, false);
        }
        writer.flush(Duration::from_secs(60))?;
    } else {
        // `-` is standard output, as `keel sql --input -` is standard input.
        let sink: Box<dyn Write> = if args.out == "-" {
            Box::new(std::io::stdout().lock())
        } else {
            Box::new(
                File::create(&args.out).with_context(|| format!("cannot create {}", args.out))?,
            )
        };
        let mut out = BufWriter::with_capacity(1 << 20, sink);
        let partitions = args.partitions.max(1);
        let mut offsets = vec![0i64; partitions as usize];
        let mut line = Vec::new();
        for done in 0..args.events {
            value.clear();
            let record = simulator.next_record(&mut value);
            line.clear();
            match args.format {
                SimFormat::Kcat => {
                    let partition = (keel_operators::sym::text_hash(&record.event_id)
                        % partitions as u64) as i32;
                    let offset = &mut offsets[partition as usize];
                    write_kcat_line(&mut line, &args.topic, partition, *offset, &record, &value);
                    *offset += 1;
                }
                SimFormat::Values => {
                    line.extend_from_slice(&value);
                    line.push(b'\n');
                }
            }
            out.write_all(&line)
                .with_context(|| format!("cannot write {}", args.out))?;
            report(done, false);
        }
        out.flush()
            .with_context(|| format!("cannot write {}", args.out))?;
    }
    report(args.events, true);
    Ok(())
}

fn sql(args: &SqlArgs) -> anyhow::Result<()> {
    let format = match args.format {
        FormatArg::Table => Format::Table,
        FormatArg::Csv => Format::Csv,
        FormatArg::Json => Format::Json,
    };
    if let Some(url) = &args.url {
        let token = args
            .token
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--url needs --token (or KEEL_TOKEN)"))?;
        let batches = crate::serve::remote_sql(url, token, &args.sql)?;
        std::io::stdout().write_all(&render(&batches, format)?)?;
        return Ok(());
    }
    let options = args.engine_options();
    let spec = match (&args.input, &args.source) {
        // `-` is standard input, as for most tools that read files.
        (Some(path), _) if path.as_os_str() == "-" => "file:/dev/stdin".to_owned(),
        (Some(path), _) => format!("file:{}", path.display()),
        (None, Some(spec)) => spec.clone(),
        (None, None) => bail!("say where events come from: --input FILE or --source SPEC"),
    };
    if args.events.is_some() && !is_simulator(&spec) {
        bail!("--events sets how many records the simulator makes: it needs --source sim");
    }
    let config = args.fleet.config(default_start(), None)?;
    let source = open_source(
        &spec,
        KafkaMode::Replay {
            idle: Duration::from_secs_f64(args.idle.max(0.1)),
        },
        || match args.events {
            Some(events) => Ok(SimSource::new(config, Some(events), None)),
            None => bail!("--source sim needs --events N"),
        },
    )?;
    let handles = Handles::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The statement is checked against the tables, still empty, before the replay: a typo is
    // an error at once, not after the whole file.
    runtime.block_on(check_sql(&handles.tables, &args.sql, format))?;
    let mut previous = 0;
    let input = source.clone();
    run_engine(
        source,
        &options,
        &handles,
        Duration::from_secs(1),
        |elapsed| {
            let records = handles.stats.records.load(Ordering::Relaxed);
            let share = input.progress().map_or_else(String::new, |done| {
                format!(", {:.1}% of the input", done * 100.0)
            });
            eprintln!(
                "replaying: {} records ({} /s), {} s{share}",
                group(records),
                group(records - previous),
                elapsed.as_secs()
            );
            previous = records;
        },
    )?;
    // The one user of a local replay is the one waiting: no limits.
    let batches = runtime.block_on(keel_api::sql::query_within(
        &handles.tables,
        keel_api::auth::Scope::All,
        &args.sql,
        keel_api::sql::Limits::NONE,
    ))?;
    std::io::stdout().write_all(&render(&batches, format)?)?;
    Ok(())
}

/// Whether `sql` is a read-only statement that plans over `tables` (not run: over tables still
/// empty, what its rows would make of it says nothing yet).
async fn check_sql(
    tables: &Arc<std::sync::RwLock<keel_sinks::live::LiveTables>>,
    sql: &str,
    format: Format,
) -> Result<(), SqlError> {
    let all = keel_api::auth::Scope::All;
    let schema = keel_api::sql::plan_within(tables, all, sql, keel_api::sql::Limits::NONE).await?;
    // CSV has no form for a nested value: said now, not after the whole replay.
    if format == Format::Csv
        && let Some(field) = schema.fields().iter().find(|f| f.data_type().is_nested())
    {
        return Err(SqlError::Invalid(format!(
            "column {:?} holds nested values ({}), which CSV cannot: use --format json or \
             table, or select its parts",
            field.name(),
            field.data_type()
        )));
    }
    Ok(())
}

fn decklog(args: &DecklogArgs) -> anyhow::Result<()> {
    let tls = args.tls.tls()?;
    let auth = crate::config::credentials(args.jwt_secret.as_deref(), args.config.as_deref())?
        .context(
            "Decklog needs credentials to check: --jwt-secret, or [[api.tokens]] in --config",
        )?;
    let kafka = KafkaAddress::parse(&args.kafka)?;
    let handoff = keel_edge::handoff::Handoff::kafka(
        &kafka.brokers,
        &kafka.topic,
        Duration::from_secs_f64(args.kafka_timeout.max(1.0)),
    )
    .map_err(anyhow::Error::msg)?;
    let plaintext = tls.is_none();
    let server = crate::edge::EdgeServer::start(
        Some(crate::edge::DecklogSettings {
            listen: args.listen.clone(),
            tls,
            handoff,
            auth,
            metrics_listen: (args.metrics_listen != "off").then(|| args.metrics_listen.clone()),
        }),
        None,
    )?;
    if let Some(address) = server.decklog_address() {
        eprintln!(
            "keel: Decklog on {}://{address}, events to {} (topic {})",
            if plaintext { "http" } else { "https" },
            kafka.brokers,
            kafka.topic
        );
    }
    if let Some(address) = server.metrics_address() {
        eprintln!("keel: Decklog metrics on http://{address}/metrics");
    }
    server.wait();
    Ok(())
}

fn helmsman(args: &HelmsmanArgs) -> anyhow::Result<()> {
    let ca_pem = args
        .decklog_ca
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display())))
        .transpose()?;
    let server = crate::edge::EdgeServer::start(
        None,
        Some(crate::edge::HelmsmanSettings {
            listen: args.listen.clone(),
            adapter: keel_edge::helmsman::AdapterConfig {
                node_id: args.node_id.clone(),
                tenant_id: args.tenant.map(|t| t.to_string()),
                decklog_url: args.decklog.clone(),
                token: args.token.clone(),
                ca_pem,
                wal_dir: args.wal.clone(),
            },
        }),
    )?;
    if let (Some(address), Some(adapter)) = (server.helmsman_address(), server.adapter()) {
        eprintln!(
            "keel: Helmsman adapter on http://{address}, forwarding to {} ({} waiting in {})",
            args.decklog,
            adapter.pending_count(),
            args.wal.display()
        );
    }
    server.wait();
    Ok(())
}

fn loadgen(args: &LoadgenArgs) -> anyhow::Result<()> {
    let target = match (
        &args.target.decklog,
        &args.target.webhook,
        &args.target.kafka,
    ) {
        (Some(url), _, _) => crate::loadgen::Target::Decklog {
            url: url.clone(),
            token: args.token.clone(),
            ca_pem: args
                .decklog_ca
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
                .transpose()?,
        },
        (_, Some(url), _) => crate::loadgen::Target::Webhook(url.trim_end_matches('/').to_owned()),
        (_, _, Some(url)) => {
            let address = KafkaAddress::parse(url)?;
            crate::loadgen::Target::Kafka {
                brokers: address.brokers,
                topic: address.topic,
            }
        }
        _ => bail!("say where the load goes: --decklog URL, --webhook URL or --kafka URL"),
    };
    let load = crate::loadgen::Load {
        events: args.events,
        rate: args.rate,
        batch: args.batch,
        connections: args.connections,
        tenant: args.tenant,
        seed: args.seed,
    };
    let started = Instant::now();
    let report = crate::loadgen::run(&target, &load, |done| {
        eprintln!(
            "loadgen: {} / {} acknowledged ({} /s)",
            group(done),
            group(args.events),
            group((done as f64 / started.elapsed().as_secs_f64().max(1e-9)) as u64)
        );
    })?;
    println!(
        "loadgen: {} events acknowledged in {:.2} s: {} events/s; ack latency per call of {} p50 {:.2} ms, p99 {:.2} ms; {} refused",
        group(report.acknowledged),
        report.elapsed.as_secs_f64(),
        group(report.rate() as u64),
        if args.target.webhook.is_some() {
            1
        } else {
            args.batch
        },
        report.percentile(50.0).as_secs_f64() * 1e3,
        report.percentile(99.0).as_secs_f64() * 1e3,
        group(report.rejected)
    );
    anyhow::ensure!(
        report.rejected == 0,
        "{} events were refused",
        report.rejected
    );
    Ok(())
}

/// Entry point of the `keel` binary.
pub fn main() -> ExitCode {
    let huge_pages_off = crate::without_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !huge_pages_off {
        tracing::debug!("the kernel kept transparent huge pages on for this process");
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    if let Some(problem) = inapplicable(&matches) {
        // The error shows the usage of the subcommand it is about.
        let mut command = Cli::command();
        command.build();
        let name = matches.subcommand_name().unwrap_or_default();
        let about = command.find_subcommand_mut(name).cloned();
        about
            .unwrap_or(command)
            .error(clap::error::ErrorKind::ArgumentConflict, problem)
            .exit();
    }
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Simulate(args) => simulate(&args),
        Command::Sql(args) => sql(&args),
        Command::GraphqlSchema => {
            print!("{}", keel_api::graphql::sdl());
            Ok(())
        }
        Command::Decklog(args) => decklog(&args),
        Command::Helmsman(args) => helmsman(&args),
        Command::Loadgen(args) => loadgen(&args),
        Command::Migrate(args) => crate::store::migrate(&args),
        Command::Backfill(args) => crate::backfill::backfill(&args),
        Command::Mesh(args) => crate::mesh::mesh(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(sql) = error.downcast_ref::<SqlError>() {
                eprintln!("error: {sql}");
                return ExitCode::from(2);
            }
            eprintln!("error: {}", causes(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors already end with their cause's words
/// (`cannot read FILE: No such file or directory`), which `{:#}` would repeat.
fn causes(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids `inapplicable` asks about are options of the subcommands it asks about (clap
    /// answers "not given" for an id it does not know, which would hide a renamed option).
    #[test]
    fn inapplicable_names_real_options() {
        let mut command = Cli::command();
        command.build();
        let has = |sub: &str, id: &str| {
            command
                .find_subcommand(sub)
                .expect("a subcommand")
                .get_arguments()
                .any(|arg| arg.get_id() == id)
        };
        // The fleet's options are both commands'; `--rate` is `keel run`'s own.
        let fleet = [FLEET_TENANTS, RECORD_SHAPE].concat();
        for id in fleet
            .iter()
            .chain(&["rate", "group", "state_horizon", "source"])
        {
            assert!(has("run", id), "run --{id}");
        }
        for id in fleet
            .iter()
            .chain(&["events", "idle", "url", "input", "source"])
        {
            assert!(has("sql", id), "sql --{id}");
        }
        assert!(has("backfill", "idle") && has("backfill", "source"));
    }

    #[test]
    fn errors_say_each_cause_once() {
        let missing = FileSource::open(std::path::Path::new("/nonexistent/x.ndjson"))
            .map(|_| ())
            .unwrap_err();
        let error = anyhow::Error::from(missing).context("cannot start the file source");
        assert_eq!(
            causes(&error),
            "cannot start the file source: cannot read /nonexistent/x.ndjson: No such file or \
             directory (os error 2)"
        );
    }

    #[test]
    fn state_horizons() {
        assert_eq!(
            parse_horizon("24h"),
            Ok(Horizon::Back(Duration::from_secs(86_400)))
        );
        assert_eq!(
            parse_horizon("90m"),
            Ok(Horizon::Back(Duration::from_secs(5_400)))
        );
        assert_eq!(
            parse_horizon("7d"),
            Ok(Horizon::Back(Duration::from_secs(604_800)))
        );
        assert_eq!(parse_horizon("none"), Ok(Horizon::None));
        assert!(
            matches!(parse_horizon("all"), Ok(Horizon::Back(d)) if d.as_secs() > 3_000_000_000)
        );
        for bad in ["24", "h", "1w", "-1h", "1.5h", ""] {
            assert!(parse_horizon(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn epoch_sizes_by_command() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Run(run)) => run.engine_options(),
            Ok(Command::Sql(sql)) => sql.engine_options(),
            Ok(Command::Backfill(backfill)) => backfill.engine_options(0, 1),
            Ok(other) => panic!("{other:?}"),
            Err(e) => panic!("{e}"),
        };
        let run = parse(&["keel", "run"]);
        assert_eq!((run.batch, run.routing), (8192, true));
        let sql = parse(&["keel", "sql", "--input", "x", "SELECT 1"]);
        assert_eq!((sql.batch, sql.routing), (65_536, false));
        // A backfill replays in large epochs without routing, and holds as many records not
        // yet stored as `keel run` does, or 8 of its epochs where they are larger.
        let backfill = &[
            "keel", "backfill", "--source", "file:x", "--from", "a", "--to", "b",
        ];
        let options = parse(backfill);
        assert_eq!((options.batch, options.routing), (65_536, false));
        assert_eq!(run.max_undurable, engine::UNDURABLE_RECORDS);
        assert_eq!(options.max_undurable, run.max_undurable);
        let small = parse(&[&backfill[..], &["--batch", "100"]].concat());
        assert_eq!((small.batch, small.max_undurable), (100, run.max_undurable));
        let large = parse(&[&backfill[..], &["--batch", "10000000"]].concat());
        assert_eq!(large.max_undurable, 8 * 10_000_000);
        // So does `keel run` in other epochs than its own (and `keel sql`, which stores
        // nothing, carries the same bound).
        for command in [
            &["keel", "run"][..],
            &["keel", "sql", "--input", "x", "SELECT 1"],
        ] {
            for batch in ["65536", "100"] {
                let other = parse(&[command, &["--batch", batch]].concat());
                assert_eq!(other.max_undurable, run.max_undurable);
            }
        }
        for command in [
            &["keel", "run"][..],
            &["keel", "sql", "--input", "x", "SELECT 1"],
        ] {
            let with = |extra: &[&str]| parse(&[command, extra].concat());
            assert_eq!(with(&["--batch", "100", "-w", "2"]).batch, 100);
            assert_eq!(with(&["--batch", "100", "-w", "2"]).workers, 2);
            for zero in [&["--batch", "0"][..], &["--workers", "0"]] {
                let err = Cli::try_parse_from([command, zero].concat()).unwrap_err();
                assert!(err.to_string().contains("must be at least 1"), "{err}");
            }
        }
        // Engine settings mean nothing to a Keel asked over `--url`, so they are refused there.
        for extra in [&["--batch", "100"][..], &["-w", "2"]] {
            let args = [&["keel", "sql", "--url", "http://k", "SELECT 1"][..], extra].concat();
            let err = Cli::try_parse_from(args).unwrap_err();
            assert!(err.to_string().contains("cannot be used with"), "{err}");
        }
    }

    #[test]
    fn only_a_replay_of_the_whole_topic_is_reconciled() {
        assert_eq!(horizon_coverage(Duration::from_secs(86_400)), None);
        assert_eq!(horizon_coverage(Duration::from_secs(365 * 86_400)), None);
        let Ok(Horizon::Back(all)) = parse_horizon("all") else {
            panic!("all is a horizon")
        };
        assert_eq!(horizon_coverage(all), Some(Coverage::ALL));
    }
}
