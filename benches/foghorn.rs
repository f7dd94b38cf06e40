//! The Foghorn benchmark: routing decisions against a full scan, HTTP throughput, freshness.
//!
//! ```text
//! cargo bench --bench foghorn -- [--nodes 1000,10000] [--requests 200000] [--seconds 10]
//!                                [--connections 32,128]
//! ```
//!
//! For each fleet size it prints:
//!
//! 1. **Decision latency in process**: p50/p99/mean of `Fleet::route` (the published snapshot,
//!    candidates ordered by their static score, pruned by an upper bound), and in the same run
//!    the reference scorer — the platform's way: every node scored from its raw figures per
//!    request — on the same requests. Both must choose the same node for every request.
//! 2. **HTTP on loopback**: requests/s and latency reported by `wrk` against `GET /<stream>` on
//!    the Foghorn port, with the engine running and every decision fed back into it, and the
//!    CPU the Keel process used meanwhile; once per `--connections` value (a balancer serves
//!    many clients at once; more connections let each wake-up serve several requests).
//! 3. **Freshness**: time from a node update entering the engine (sent into its input) to the
//!    routing snapshot holding it, measured every 20 ms while `wrk` runs, and once idle.
//!
//! `wrk` must be installed (`apt-get install wrk`; `scripts/bench-foghorn` does it).

mod support;

use keel_operators::time::now_ms;
use support::cpu_seconds;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel::engine::{self, EngineOptions, Handles};
use keel::foghorn::FoghornServer;
use keel_dataflows::foghorn::score::score_node;
use keel_dataflows::foghorn::{Cutoff, Fleet, NodeLoad, Place, Policy, Request, Weights};
use keel_operators::sym::Sym;
use keel_operators::time::format_rfc3339;
use keel_sources::event::{NodeMode, NodeStream};
use keel_sources::memory::{MemorySender, MemorySource, OwnedRecord};
use serde_json::{Value, json};
use uuid::Uuid;

const TENANT: &str = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
const STREAMS: usize = 500;

struct Options {
    nodes: Vec<usize>,
    requests: usize,
    seconds: u64,
    connections: Vec<usize>,
}

fn parse_args() -> Options {
    let mut options = Options {
        nodes: vec![1000, 10_000],
        requests: 200_000,
        seconds: 10,
        connections: vec![32, 128],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                options.nodes = value()
                    .split(',')
                    .map(|n| n.parse().expect("--nodes takes numbers"))
                    .collect();
            }
            "--requests" => options.requests = value().parse().expect("--requests takes a number"),
            "--seconds" => options.seconds = value().parse().expect("--seconds takes a number"),
            "--connections" => {
                options.connections = value()
                    .split(',')
                    .map(|n| n.parse().expect("--connections takes numbers"))
                    .collect();
            }
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    options
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One node of a realistic fleet: spread over the inhabited latitudes, loaded 5–95 %, each
/// carrying a few of the streams.
fn node(i: usize, rng: &mut Rng, seen_at: i64) -> NodeLoad {
    let bw_limit = [125_000_000u64, 250_000_000, 1_250_000_000][rng.below(3) as usize];
    let load = 0.05 + 0.9 * rng.unit();
    let mut streams: Vec<NodeStream> = (0..1 + rng.below(6))
        .map(|_| NodeStream {
            name: Sym::new(&format!("stream-{}", rng.below(STREAMS as u64))),
            viewers: rng.below(400),
            inputs: u64::from(rng.below(4) == 0),
            bandwidth: 300_000 + rng.below(700_000),
            ..NodeStream::default()
        })
        .collect();
    streams.sort_by_key(|s| s.name);
    streams.dedup_by_key(|s| s.name);
    NodeLoad {
        node: Sym::new(&format!("edge-{i:05}")),
        tenant: Uuid::parse_str(TENANT).expect("a UUID"),
        host: Sym::new(&format!("https://edge-{i:05}.example")),
        seen_at,
        cpu_tenths: (load * 1000.0) as u32,
        ram_current: (load * 32e9) as u64,
        ram_max: 32_000_000_000,
        up_speed: (load * 0.9 * bw_limit as f64) as u64,
        down_speed: 1_000_000,
        reported_bw_limit: bw_limit,
        add_bandwidth: 0,
        pending_viewers: 0,
        latitude: Some(-50.0 + 115.0 * rng.unit()),
        longitude: Some(-180.0 + 360.0 * rng.unit()),
        location: Sym::default(),
        mode: if rng.below(50) == 0 {
            NodeMode::Draining
        } else {
            NodeMode::Normal
        },
        healthy: true,
        capabilities: vec![Sym::new("edge"), Sym::new("ingest")],
        streams,
        connections: rng.below(2000),
    }
}

fn requests(count: usize, rng: &mut Rng) -> Vec<Request> {
    (0..count)
        .map(|_| {
            let client = Place::new(-50.0 + 115.0 * rng.unit(), -180.0 + 360.0 * rng.unit())
                .expect("in range");
            let stream = format!("stream-{}", rng.below(STREAMS as u64));
            Request::view(Some(&stream), Some(client))
        })
        .collect()
}

/// The platform's way: every node scored from scratch for every request.
fn reference(
    nodes: &[NodeLoad],
    request: &Request,
    weights: &Weights,
    watermark: i64,
) -> Option<Sym> {
    let mut best: Option<(u64, Sym)> = None;
    for node in nodes {
        if let Ok(score) = score_node(node, request, weights, watermark, &Cutoff::default()) {
            let better =
                best.is_none_or(|(s, id)| score.total > s || (score.total == s && node.node < id));
            if better {
                best = Some((score.total, node.node));
            }
        }
    }
    best.map(|b| b.1)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summarize(mut samples: Vec<f64>) -> (f64, f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        mean,
        samples.last().copied().unwrap_or(f64::NAN),
    )
}

fn decision_latency(count: usize, options: &Options) {
    let now = 1_800_000_000_000;
    let mut rng = Rng(count as u64);
    let nodes: Vec<NodeLoad> = (0..count).map(|i| node(i, &mut rng, now)).collect();
    let requests = requests(options.requests, &mut rng);
    let built = Instant::now();
    let fleet = Fleet::build(
        nodes.iter().cloned().map(Arc::new).collect(),
        Policy::default(),
        now,
    );
    let build = built.elapsed();
    // A publish under load patches the snapshot with the nodes that changed since the last one.
    let changed: Vec<Arc<NodeLoad>> = nodes
        .iter()
        .step_by((count / 50).max(1))
        .map(|n| {
            let mut n = n.clone();
            n.add_bandwidth += 100_000;
            Arc::new(n)
        })
        .collect();
    let patched = Instant::now();
    for _ in 0..20 {
        std::hint::black_box(fleet.with_changes(&changed, now + 1).expect("known nodes"));
    }
    let patch = patched.elapsed() / 20;
    let mut fast = Vec::with_capacity(requests.len());
    let mut chosen = Vec::with_capacity(requests.len());
    for request in &requests {
        let t = Instant::now();
        let routed = fleet.route(request, 1);
        fast.push(t.elapsed().as_nanos() as f64 / 1000.0);
        chosen.push(routed.ok().map(|r| r.candidates[0].node.node));
    }
    let weights = Weights::default();
    let reference_count = requests
        .len()
        .min(if count > 5000 { 20_000 } else { 50_000 });
    let mut slow = Vec::with_capacity(reference_count);
    for (request, fast_choice) in requests.iter().zip(&chosen).take(reference_count) {
        let t = Instant::now();
        let choice = reference(&nodes, request, &weights, now);
        slow.push(t.elapsed().as_nanos() as f64 / 1000.0);
        assert_eq!(
            &choice, fast_choice,
            "the fast path and the full scan disagree"
        );
    }
    let (p50, p99, mean, max) = summarize(fast);
    let (r50, r99, rmean, _) = summarize(slow);
    println!(
        "| {count} | Keel `Fleet::route` | {p50:.2} | {p99:.2} | {mean:.2} | {max:.1} | {} |",
        requests.len()
    );
    println!(
        "| {count} | reference full scan | {r50:.2} | {r99:.2} | {rmean:.2} | — | {reference_count} |"
    );
    println!(
        "| {count} | ratio (scan / Keel) | {:.1}× | {:.1}× | {:.1}× | | snapshot: build {:.2} ms, patch of {} nodes {:.3} ms |",
        r50 / p50,
        r99 / p99,
        rmean / mean,
        build.as_secs_f64() * 1000.0,
        changed.len(),
        patch.as_secs_f64() * 1000.0
    );
}

/// A version-2 `node_lifecycle_update` record for `load`, stamped `time`.
fn record(load: &NodeLoad, time: i64) -> OwnedRecord {
    let streams: serde_json::Map<String, Value> = load
        .streams
        .iter()
        .map(|s| {
            (
                format!("live+{}", s.name),
                json!({"total": s.viewers, "inputs": s.inputs, "bandwidth": s.bandwidth}),
            )
        })
        .collect();
    let value = json!({
        "event_id": Uuid::new_v4().to_string(),
        "event_type": "node_lifecycle_update",
        "timestamp": format_rfc3339(time),
        "tenant_id": TENANT,
        "schema_version": 2,
        "data": {
            "node_id": load.node.as_str(),
            "tenant_id": TENANT,
            "node_lifecycle_update": {
                "node_id": load.node.as_str(),
                "cpu_tenths": load.cpu_tenths,
                "ram_max": load.ram_max.to_string(),
                "ram_current": load.ram_current.to_string(),
                "up_speed": load.up_speed.to_string(),
                "down_speed": load.down_speed.to_string(),
                "bw_limit": load.reported_bw_limit.to_string(),
                "latitude": load.latitude,
                "longitude": load.longitude,
                "base_url": load.host.as_str(),
                "is_healthy": true,
                "operational_mode": if load.mode == NodeMode::Normal { "NODE_OPERATIONAL_MODE_NORMAL" } else { "NODE_OPERATIONAL_MODE_DRAINING" },
                "capabilities": {"edge": true, "ingest": true},
                "connections_current": load.connections,
                "streams": Value::Object(streams),
            }
        }
    });
    OwnedRecord {
        value: serde_json::to_vec(&value).expect("JSON"),
        headers: Vec::new(),
    }
}

/// Sends a changed update of `load` and waits until routing's snapshot holds it.
fn freshness_probe(sender: &MemorySender, handles: &Handles, load: &mut NodeLoad) -> f64 {
    load.cpu_tenths = (load.cpu_tenths + 7) % 1000;
    let time = now_ms();
    let started = Instant::now();
    sender.send(record(load, time)).expect("the engine reads");
    loop {
        let fleet = handles.fleet.load();
        if fleet
            .node(load.node.as_str())
            .is_some_and(|n| n.seen_at == time && n.cpu_tenths == load.cpu_tenths)
        {
            return started.elapsed().as_secs_f64() * 1000.0;
        }
        drop(fleet);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a node update did not reach routing within 10 s"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The `wrk` script: 1,000 request paths, formatted once when `wrk` starts so that the load
/// generator, which shares the two cores with Keel, spends nothing on building requests.
fn wrk_script(dir: &std::path::Path, rng: &mut Rng) -> std::path::PathBuf {
    let paths: Vec<String> = (0..1000)
        .map(|_| {
            format!(
                "\"/stream-{}?lat={:.2}&lon={:.2}\"",
                rng.below(STREAMS as u64),
                -50.0 + 115.0 * rng.unit(),
                -180.0 + 360.0 * rng.unit()
            )
        })
        .collect();
    let script = format!(
        "local paths = {{{}}}\nlocal requests = {{}}\nlocal i = 0\ninit = function(args)\n  for k, p in ipairs(paths) do requests[k] = wrk.format(\"GET\", p) end\nend\nrequest = function()\n  i = i % #requests + 1\n  return requests[i]\nend\n",
        paths.join(",")
    );
    let path = dir.join("foghorn.lua");
    std::fs::write(&path, script).expect("the script is written");
    path
}

/// Returns the HTTP table row and the freshness table row.
fn http_and_freshness(count: usize, connections: usize, options: &Options) -> (String, String) {
    let handles = Handles::default();
    let (source, sender) = MemorySource::new("bench", 65_536);
    let engine_handles = handles.clone();
    let engine = std::thread::spawn(move || {
        engine::run(Arc::new(source), &EngineOptions::default(), &engine_handles)
    });
    let mut rng = Rng(7 + count as u64);
    let time = now_ms();
    let mut nodes: Vec<NodeLoad> = (0..count).map(|i| node(i, &mut rng, time)).collect();
    for load in &nodes {
        sender.send(record(load, time)).expect("the engine reads");
    }
    let started = Instant::now();
    while handles.fleet.load().nodes().len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the fleet did not fill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let server = FoghornServer::start("127.0.0.1:0", None, None, None, None, &handles)
        .expect("a loopback port");
    let idle: Vec<f64> = (0..50)
        .map(|_| {
            let f = freshness_probe(&sender, &handles, &mut nodes[0]);
            std::thread::sleep(Duration::from_millis(5));
            f
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let script = wrk_script(dir.path(), &mut rng);
    let url = format!("http://{}", server.address());
    let probing = Arc::new(AtomicBool::new(true));
    let probe = {
        let (sender, handles, probing) = (sender.clone(), handles.clone(), probing.clone());
        let mut load = nodes[1].clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            std::thread::sleep(Duration::from_millis(500));
            while probing.load(Ordering::Relaxed) {
                samples.push(freshness_probe(&sender, &handles, &mut load));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let cpu = cpu_seconds();
    let wall = Instant::now();
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", options.seconds),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(&url)
        .output()
        .unwrap_or_else(|e| {
            panic!("wrk is needed for the HTTP part ({e}): apt-get install wrk, or run scripts/bench-foghorn")
        });
    let cores = (cpu_seconds() - cpu) / wall.elapsed().as_secs_f64();
    probing.store(false, Ordering::Relaxed);
    let busy = probe.join().expect("the probe thread");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wrk failed: {report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |prefix: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(|l| l.trim().to_owned())
            .unwrap_or_else(|| format!("{prefix} (not reported)"))
    };
    let rps = field("Requests/sec:");
    let non2xx = report
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "all 2xx".to_owned());
    let stats = handles.foghorn.as_ref();
    let routed = stats.routed.load(Ordering::Relaxed);
    let row = format!(
        "| {count} | {connections} | {} | {} | {} | {cores:.2} | {routed} | {non2xx} |",
        rps.trim_start_matches("Requests/sec:").trim(),
        field("50%").trim_start_matches("50%").trim(),
        field("99%").trim_start_matches("99%").trim(),
    );
    let (i50, i99, _, imax) = summarize(idle);
    let (b50, b99, _, bmax) = summarize(busy.clone());
    let fresh = format!(
        "| {count} | {connections} | {i50:.2} | {i99:.2} | {imax:.2} | {} | {b50:.2} | {b99:.2} | {bmax:.2} |",
        busy.len()
    );
    server.stop();
    handles.shutdown.store(true, Ordering::Relaxed);
    drop(sender);
    engine
        .join()
        .expect("the engine thread")
        .expect("the engine ran");
    (row, fresh)
}

fn main() {
    let options = parse_args();
    println!("## Foghorn routing\n");
    println!("### Decision latency in process (µs)\n");
    println!("| nodes | scorer | p50 | p99 | mean | max | requests |");
    println!("|---|---|---|---|---|---|---|");
    for &count in &options.nodes {
        decision_latency(count, &options);
    }
    println!("\n### HTTP `GET /<stream>` on loopback (wrk, one thread, decisions fed back)\n");
    println!(
        "| nodes | connections | requests/s | latency p50 | latency p99 | Keel cores | decisions | status |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut freshness = Vec::new();
    for &count in &options.nodes {
        for &connections in &options.connections {
            let (row, fresh) = http_and_freshness(count, connections, &options);
            println!("{row}");
            freshness.push(fresh);
        }
    }
    println!("\n### Freshness: node update sent → used by routing (ms)\n");
    println!(
        "| nodes | wrk connections | idle p50 | idle p99 | idle max | probes under wrk | p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in freshness {
        println!("{row}");
    }
}
