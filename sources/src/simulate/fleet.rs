//! The simulated fleet and its discrete-event clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use keel_operators::time::{MINUTE, SECOND, parse_rfc3339};
use uuid::Uuid;

use super::SimRecord;
use super::encode::{Obj, V1Data};
use crate::event::great_circle_km;

/// Which wire version to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    /// The first platform release: kebab-case types, string maps.
    V1,
    /// The current platform: JSON envelope around protobuf-JSON triggers.
    #[default]
    V2,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Everything follows from this.
    pub seed: u64,
    /// Wire version of the records.
    pub wire: Wire,
    /// Tenants owning streams (the first also owns the nodes).
    pub tenants: usize,
    /// Edge nodes.
    pub nodes: usize,
    /// Streams.
    pub streams: usize,
    /// Viewer arrivals per simulated second, over the whole fleet.
    pub arrivals_per_second: f64,
    /// Mean viewing session, seconds.
    pub mean_session_s: f64,
    /// Mean live period of a stream before it ends, seconds.
    pub mean_live_s: f64,
    /// Extra malformed records per good record (0.01 = one in a hundred).
    pub malformed: f64,
    /// Simulated start time, ms since the epoch.
    pub start: i64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            wire: Wire::V2,
            tenants: 3,
            nodes: 12,
            streams: 40,
            arrivals_per_second: 50.0,
            mean_session_s: 240.0,
            mean_live_s: 2700.0,
            malformed: 0.0,
            start: parse_rfc3339("2026-11-01T00:00:00Z").expect("a valid constant"),
        }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.u64() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponentially distributed with the given mean.
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Log-normally distributed with the given mean and shape.
    fn lognormal(&mut self, mean: f64, sigma: f64) -> f64 {
        let mu = mean.ln() - sigma * sigma / 2.0;
        (mu + sigma * self.normal()).exp()
    }

    fn uuid(&mut self) -> Uuid {
        let bytes = (u128::from(self.u64()) << 64) | u128::from(self.u64());
        uuid::Builder::from_random_bytes(bytes.to_be_bytes()).into_uuid()
    }

    fn pick<'a, T>(&mut self, items: &'a [T], weight: impl Fn(&T) -> f64) -> &'a T {
        let total: f64 = items.iter().map(&weight).sum();
        let mut x = self.unit() * total;
        for item in items {
            x -= weight(item);
            if x < 0.0 {
                return item;
            }
        }
        &items[items.len() - 1]
    }
}

/// A place viewers come from and nodes stand in: (country, city, latitude, longitude, weight).
type Place = (&'static str, &'static str, f64, f64, f64);

const PLACES: &[Place] = &[
    ("US", "New York", 40.71, -74.01, 14.0),
    ("US", "Los Angeles", 34.05, -118.24, 9.0),
    ("US", "Chicago", 41.88, -87.63, 5.0),
    ("CA", "Toronto", 43.65, -79.38, 4.0),
    ("MX", "Mexico City", 19.43, -99.13, 4.0),
    ("BR", "São Paulo", -23.55, -46.63, 7.0),
    ("AR", "Buenos Aires", -34.60, -58.38, 2.0),
    ("GB", "London", 51.51, -0.13, 8.0),
    ("NL", "Amsterdam", 52.37, 4.90, 5.0),
    ("DE", "Frankfurt", 50.11, 8.68, 6.0),
    ("DE", "Berlin", 52.52, 13.40, 3.0),
    ("FR", "Paris", 48.86, 2.35, 6.0),
    ("ES", "Madrid", 40.42, -3.70, 3.0),
    ("IT", "Milan", 45.46, 9.19, 3.0),
    ("SE", "Stockholm", 59.33, 18.07, 2.0),
    ("PL", "Warsaw", 52.23, 21.01, 2.0),
    ("ZA", "Johannesburg", -26.20, 28.05, 2.0),
    ("IN", "Mumbai", 19.08, 72.88, 6.0),
    ("SG", "Singapore", 1.35, 103.82, 3.0),
    ("JP", "Tokyo", 35.68, 139.69, 5.0),
    ("KR", "Seoul", 37.57, 126.98, 3.0),
    ("AU", "Sydney", -33.87, 151.21, 3.0),
];

/// Node sites, by index into `PLACES`.
const SITES: &[usize] = &[0, 7, 9, 1, 18, 19, 5, 8, 11, 17, 21, 3];

/// Viewers a node carries at full load in a small fleet.
const BASE_CAPACITY: f64 = 400.0;

/// Bytes per second a viewer draws from its node (a 3.6 Mbit/s rendition).
const VIEWER_BYTES_PER_S: u64 = 450_000;

/// The share of a node's capacity its expected viewers fill, once sessions reach their steady
/// number (arrivals × mean session).
const EXPECTED_LOAD: f64 = 0.5;

/// Sizes `nodes` for the traffic `config` sends, as an operator sizes a fleet: each node's
/// capacity (and bandwidth limit) leaves its expected share of the open sessions at about half
/// load. Viewers go to their nearest node, so a node's share is the weight of the places
/// nearest to it. Without this a busy simulation (`keel run` at 1,000 records/s keeps some
/// 80,000 sessions open) drove every node past full load within seconds: all unhealthy and out of
/// bandwidth, with nothing left to route to.
fn size_fleet(nodes: &mut [Node], config: &SimConfig) {
    let open = config.arrivals_per_second.max(0.0) * config.mean_session_s.max(0.0);
    let total: f64 = PLACES.iter().map(|p| p.4).sum();
    let mut share = vec![0.0; nodes.len()];
    for place in PLACES {
        share[nearest_node(nodes, place.2, place.3).0] += place.4 / total;
    }
    for (node, share) in nodes.iter_mut().zip(share) {
        let capacity = (open * share / EXPECTED_LOAD).max(BASE_CAPACITY);
        // Its link carries it at full load (the smaller base links would run out at a third
        // of it).
        node.bw_limit = node
            .bw_limit
            .max((capacity * VIEWER_BYTES_PER_S as f64) as u64);
        node.capacity = capacity;
    }
}

/// The node nearest to a point, and its distance in km (the lower index of two as near).
fn nearest_node(nodes: &[Node], latitude: f64, longitude: f64) -> (usize, f64) {
    nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let p = PLACES[node.place];
            (n, great_circle_km(latitude, longitude, p.2, p.3))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .expect("at least one node")
}

const CONNECTORS: &[(&str, f64)] = &[("HLS", 6.0), ("WebRTC", 2.0), ("DASH", 1.0), ("RTMP", 0.3)];
const TIERS: &[(&str, u32, f64, u64)] = &[
    ("2160p", 2160, 30.0, 16_000_000),
    ("1080p", 1080, 60.0, 6_000_000),
    ("1080p", 1080, 30.0, 4_500_000),
    ("720p", 720, 30.0, 2_500_000),
    ("480p", 480, 30.0, 1_200_000),
];
const UNKNOWN_TYPES: &[&str] = &["storage_snapshot", "clip_lifecycle", "federation_event"];
const POLL: i64 = 10 * SECOND;

#[derive(Debug)]
struct Tenant {
    id: String,
}

#[derive(Debug)]
struct Node {
    id: String,
    place: usize,
    base_url: String,
    /// Viewers the node carries at full load ([`size_fleet`]).
    capacity: f64,
    bw_limit: u64,
    ram_max: u64,
    next_session: u64,
    viewers: u32,
}

#[derive(Debug)]
struct Stream {
    tenant: usize,
    name: String,
    id: String,
    node: usize,
    weight: f64,
    live: bool,
    started_at: i64,
    tier: usize,
    viewers: u32,
    total_viewers: u32,
    delivered: u64,
    ingested: u64,
    packets: u64,
    lost: u64,
    dry: bool,
}

#[derive(Debug)]
struct Session {
    stream: usize,
    node: usize,
    id: String,
    host: String,
    place: usize,
    connector: &'static str,
    latitude: f64,
    longitude: f64,
    started: i64,
    serial: u64,
    open: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    StreamStart(usize),
    StreamStop(usize),
    StreamPoll(usize),
    NodePoll(usize),
    Arrival,
    /// Session slot and serial (slots are reused; the serial tells sessions apart).
    Leave(usize, u64),
    Dry(usize),
    Recover(usize),
    Unknown,
}

/// The fleet simulator. See the module documentation.
#[derive(Debug)]
pub struct Simulator {
    config: SimConfig,
    rng: Rng,
    /// Draws for malformed records only, so they never change the good ones.
    bad_rng: Rng,
    clock: i64,
    tenants: Vec<Tenant>,
    nodes: Vec<Node>,
    streams: Vec<Stream>,
    sessions: Vec<Session>,
    free_sessions: Vec<usize>,
    hosts: Vec<String>,
    queue: BinaryHeap<Reverse<(i64, u64, Task)>>,
    seq: u64,
    next_serial: u64,
    pending: VecDeque<(SimRecord, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
}

impl Simulator {
    /// A fleet at its start time.
    pub fn new(config: SimConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let bad_rng = Rng::new(config.seed ^ 0x6261_645f_7265_636f);
        let tenants = (0..config.tenants.max(1))
            .map(|_| Tenant {
                id: rng.uuid().to_string(),
            })
            .collect();
        let mut nodes: Vec<Node> = (0..config.nodes.max(1))
            .map(|i| {
                let place = SITES[i % SITES.len()];
                let city: String = PLACES[place]
                    .1
                    .chars()
                    .filter(char::is_ascii_alphabetic)
                    .map(|c| c.to_ascii_lowercase())
                    .take(3)
                    .collect();
                let id = format!("edge-{city}-{}", i / SITES.len() + 1);
                Node {
                    base_url: format!("https://{id}.edge.frameworks.example"),
                    id,
                    place,
                    capacity: BASE_CAPACITY,
                    bw_limit: [125_000_000, 62_500_000, 250_000_000][i % 3],
                    ram_max: [16, 32, 64][i % 3] << 30,
                    next_session: 1,
                    viewers: 0,
                }
            })
            .collect();
        size_fleet(&mut nodes, &config);
        let streams = (0..config.streams.max(1))
            .map(|i| Stream {
                tenant: i % config.tenants.max(1),
                name: format!("{:016x}", rng.u64()),
                id: rng.uuid().to_string(),
                node: rng.below(nodes.len()),
                // Popularity falls off like Zipf: a few streams draw most viewers.
                weight: 1.0 / (i as f64 + 1.0).powf(0.9),
                live: false,
                started_at: 0,
                tier: rng.below(TIERS.len()),
                viewers: 0,
                total_viewers: 0,
                delivered: 0,
                ingested: 0,
                packets: 0,
                lost: 0,
                dry: false,
            })
            .collect();
        let mut sim = Simulator {
            clock: config.start,
            config,
            rng,
            bad_rng,
            tenants,
            nodes,
            streams,
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            hosts: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            next_serial: 0,
            pending: VecDeque::new(),
            spare: Vec::new(),
        };
        let start = sim.config.start;
        // Streams come up within the first ten seconds, so the fleet is busy almost at once.
        for i in 0..sim.streams.len() {
            let at = start + (sim.rng.unit() * 10.0 * SECOND as f64) as i64;
            sim.schedule(at, Task::StreamStart(i));
        }
        for n in 0..sim.nodes.len() {
            let at = start + sim.rng.below(POLL as usize) as i64;
            sim.schedule(at, Task::NodePoll(n));
        }
        let first = start + sim.arrival_gap();
        sim.schedule(first, Task::Arrival);
        sim.schedule(start + 3 * MINUTE, Task::Unknown);
        sim
    }

    /// The tenant ids of the fleet, in order; the first also owns the nodes.
    pub fn tenants(&self) -> Vec<String> {
        self.tenants.iter().map(|t| t.id.clone()).collect()
    }

    fn schedule(&mut self, at: i64, task: Task) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, task)));
    }

    fn arrival_gap(&mut self) -> i64 {
        let rate = self.config.arrivals_per_second.max(1e-6);
        (self.rng.exp(1000.0 / rate) as i64).max(1)
    }

    /// Writes the next record into `out` and describes it.
    pub fn next_record(&mut self, out: &mut Vec<u8>) -> SimRecord {
        while self.pending.is_empty() {
            let Reverse((at, _, task)) = self.queue.pop().expect("the clock always has tasks");
            self.clock = at;
            self.run(task);
        }
        let (record, bytes) = self.pending.pop_front().expect("not empty");
        out.extend_from_slice(&bytes);
        self.spare.push(bytes);
        record
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b
    }

    fn run(&mut self, task: Task) {
        match task {
            Task::StreamStart(s) => self.stream_start(s),
            Task::StreamStop(s) => self.stream_stop(s),
            Task::StreamPoll(s) => {
                if self.streams[s].live {
                    self.emit_stream_update(s);
                    self.schedule(self.clock + POLL, Task::StreamPoll(s));
                }
            }
            Task::NodePoll(n) => {
                self.emit_node_update(n);
                self.schedule(self.clock + POLL, Task::NodePoll(n));
            }
            Task::Arrival => {
                self.arrival();
                let gap = self.arrival_gap();
                self.schedule(self.clock + gap, Task::Arrival);
            }
            Task::Leave(slot, serial) => self.leave(slot, serial),
            Task::Dry(s) => {
                if self.streams[s].live && !self.streams[s].dry {
                    self.streams[s].dry = true;
                    self.emit_buffer(s, "DRY", true);
                    let back = (self.rng.unit() * 25.0 + 5.0) as i64 * SECOND;
                    self.schedule(self.clock + back, Task::Recover(s));
                }
            }
            Task::Recover(s) => {
                if self.streams[s].live && self.streams[s].dry {
                    self.streams[s].dry = false;
                    self.emit_buffer(s, "RECOVER", false);
                }
            }
            Task::Unknown => {
                self.emit_unknown();
                self.schedule(self.clock + 5 * MINUTE, Task::Unknown);
            }
        }
    }

    fn stream_start(&mut self, s: usize) {
        let stream = &mut self.streams[s];
        stream.live = true;
        stream.started_at = self.clock;
        stream.total_viewers = 0;
        stream.delivered = 0;
        stream.ingested = 0;
        stream.packets = 0;
        stream.lost = 0;
        self.emit_ingest(s);
        self.emit_tracks(s);
        let poll = self.clock + 1 + self.rng.below(POLL as usize) as i64;
        self.schedule(poll, Task::StreamPoll(s));
        let live = (self.rng.lognormal(self.config.mean_live_s, 0.6) * SECOND as f64) as i64;
        self.schedule(self.clock + live.max(MINUTE), Task::StreamStop(s));
        let dry = (self.rng.exp(1200.0) * SECOND as f64) as i64;
        if dry < live {
            self.schedule(self.clock + dry, Task::Dry(s));
        }
    }

    fn stream_stop(&mut self, s: usize) {
        // Viewers leave with the stream, within a few seconds of its end.
        let open: Vec<(usize, u64)> = (0..self.sessions.len())
            .filter(|&i| self.sessions[i].open && self.sessions[i].stream == s)
            .map(|i| (i, self.sessions[i].serial))
            .collect();
        for (slot, serial) in open {
            let at = self.clock + self.rng.below(3000) as i64;
            self.schedule(at, Task::Leave(slot, serial));
        }
        let stream = &mut self.streams[s];
        stream.live = false;
        stream.dry = false;
        self.emit_end(s);
        let gap = (self.rng.unit() * 9.0 + 1.0) as i64 * MINUTE;
        self.schedule(self.clock + 4 * SECOND + gap, Task::StreamStart(s));
    }

    fn arrival(&mut self) {
        let live: Vec<usize> = (0..self.streams.len())
            .filter(|&s| self.streams[s].live)
            .collect();
        if live.is_empty() {
            return;
        }
        let weights: Vec<f64> = live.iter().map(|&s| self.streams[s].weight).collect();
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.unit() * total;
        let mut s = live[live.len() - 1];
        for (i, w) in weights.iter().enumerate() {
            x -= w;
            if x < 0.0 {
                s = live[i];
                break;
            }
        }
        let place = {
            let indices: Vec<usize> = (0..PLACES.len()).collect();
            *self.rng.pick(&indices, |&i| PLACES[i].4)
        };
        let latitude = (PLACES[place].2 + self.rng.normal() * 0.3).clamp(-89.0, 89.0);
        let longitude = (PLACES[place].3 + self.rng.normal() * 0.3).clamp(-179.0, 179.0);
        // Route to the nearest node, as the balancer's geo term mostly does.
        let (node, km) = nearest_node(&self.nodes, latitude, longitude);
        let ok = !self.rng.chance(0.015);
        let score = (2000.0 - km / 10.0).max(1.0) as u64 + self.rng.below(50) as u64;
        self.emit_routing(s, node, place, latitude, longitude, km, ok, score);
        if !ok {
            return;
        }
        let host = if !self.hosts.is_empty() && self.rng.chance(0.15) {
            self.hosts[self.rng.below(self.hosts.len())].clone()
        } else {
            let ip = self.rng.u64();
            let host = format!(
                "100.{}.{}.{}",
                64 + (ip >> 8) % 64,
                (ip >> 16) % 256,
                ip % 254 + 1
            );
            if self.hosts.len() < 50_000 {
                self.hosts.push(host.clone());
            }
            host
        };
        let connector = self.rng.pick(CONNECTORS, |c| c.1).0;
        let node_ref = &mut self.nodes[node];
        let id = node_ref.next_session.to_string();
        node_ref.next_session += 1;
        node_ref.viewers += 1;
        let stream = &mut self.streams[s];
        stream.viewers += 1;
        stream.total_viewers += 1;
        let session = Session {
            stream: s,
            node,
            id,
            host,
            place,
            connector,
            latitude,
            longitude,
            started: self.clock + 20 + self.rng.below(180) as i64,
            serial: self.next_serial,
            open: true,
        };
        self.next_serial += 1;
        let slot = match self.free_sessions.pop() {
            Some(slot) => {
                self.sessions[slot] = session;
                slot
            }
            None => {
                self.sessions.push(session);
                self.sessions.len() - 1
            }
        };
        let (arrived, started, serial) = (
            self.clock,
            self.sessions[slot].started,
            self.sessions[slot].serial,
        );
        self.clock = started;
        self.emit_connect(slot);
        self.clock = arrived;
        let watch = (self.rng.lognormal(self.config.mean_session_s, 1.0) * SECOND as f64) as i64;
        self.schedule(started + watch.max(SECOND), Task::Leave(slot, serial));
    }

    fn leave(&mut self, slot: usize, serial: u64) {
        let session = &self.sessions[slot];
        if !session.open || session.serial != serial {
            return;
        }
        let duration_ms = (self.clock - session.started).max(0);
        let bitrate = TIERS[self.streams[session.stream].tier].3;
        let down = (duration_ms as f64 / 1000.0 * bitrate as f64 / 8.0
            * (0.8 + 0.2 * self.rng.unit())) as u64;
        let up = down / 120;
        let (s, n) = (session.stream, session.node);
        self.sessions[slot].open = false;
        self.streams[s].viewers = self.streams[s].viewers.saturating_sub(1);
        self.streams[s].delivered += down;
        self.nodes[n].viewers = self.nodes[n].viewers.saturating_sub(1);
        self.emit_disconnect(slot, duration_ms / SECOND, up, down);
        self.free_sessions.push(slot);
    }

    // ------------------------------------------------------------------------------------------
    // Records.

    fn push(&mut self, event_type: &'static str, tenant: usize, bytes: Vec<u8>, event_id: String) {
        let record = SimRecord {
            event_type,
            tenant_id: self.tenants[tenant].id.clone(),
            event_id,
            source: match self.config.wire {
                Wire::V1 => "helmsman",
                Wire::V2 => "foghorn",
            },
            time: self.clock,
        };
        let malformed = self.config.malformed > 0.0 && self.bad_rng.chance(self.config.malformed);
        let bad = malformed.then(|| self.malformed(&record, &bytes));
        self.pending.push_back((record, bytes));
        if let Some(bad) = bad {
            self.pending.push_back(bad);
        }
    }

    /// Writes one event in the configured wire version.
    fn event(
        &mut self,
        (v2_type, payload_key, trigger): (&'static str, &'static str, &'static str),
        v1_type: &'static str,
        tenant: usize,
        node: Option<usize>,
        v2: impl FnOnce(&mut Obj<'_>),
        v1: impl FnOnce(&mut V1Data<'_>),
    ) {
        let id = self.rng.uuid().to_string();
        let mut out = self.buffer();
        let tenant_id = self.tenants[tenant].id.clone();
        let node_id = node.map(|n| self.nodes[n].id.clone()).unwrap_or_default();
        let clock = self.clock;
        // Drawn in both versions so the two wires describe the same fleet.
        let request = format!("{:032x}", self.rng.u64());
        match self.config.wire {
            Wire::V2 => {
                let mut envelope = Obj::open(&mut out);
                envelope
                    .str("event_id", &id)
                    .str("event_type", v2_type)
                    .time("timestamp", clock)
                    .str("source", "foghorn")
                    .str("tenant_id", &tenant_id)
                    .num("schema_version", 2)
                    .str("source_region", "eu-west")
                    .str("source_cluster_id", "central-primary")
                    .obj("data", |data| {
                        data.str("trigger_type", trigger)
                            .str_opt("node_id", &node_id)
                            .int64("timestamp", clock / SECOND)
                            .str("request_id", &request)
                            .str("tenant_id", &tenant_id)
                            .obj(payload_key, v2);
                    });
                envelope.close();
                self.push(v2_type, tenant, out, id);
            }
            Wire::V1 => {
                let mut envelope = Obj::open(&mut out);
                envelope
                    .str("id", &id)
                    .str("type", v1_type)
                    .str("event_id", &id)
                    .str("event_type", v1_type)
                    .time("timestamp", clock)
                    .str("source", "helmsman")
                    .str("schema_version", "1.0")
                    .with("data", |out| {
                        let mut data = V1Data::open(out);
                        data.put("tenant_id", &tenant_id)
                            .put("timestamp", clock / SECOND);
                        if !node_id.is_empty() {
                            data.put("node_id", &node_id);
                        }
                        v1(&mut data);
                        data.close();
                    });
                envelope.close();
                self.push(v1_type, tenant, out, id);
            }
        }
    }

    fn emit_ingest(&mut self, s: usize) {
        let st = &self.streams[s];
        let (tenant, node) = (st.tenant, st.node);
        let (name, id) = (st.name.clone(), st.id.clone());
        let p = PLACES[self.nodes[node].place];
        let hostname = format!("{}:1935", self.nodes[node].id);
        self.event(
            ("push_rewrite", "push_rewrite", "PUSH_REWRITE"),
            "stream-ingest",
            tenant,
            Some(node),
            |o| {
                o.str("push_url", "rtmp://ingest/live/***")
                    .str("hostname", &hostname)
                    .str("stream_name", &format!("live+{name}"))
                    .str("protocol", "RTMP")
                    .num("latitude", p.2)
                    .num("longitude", p.3)
                    .str("stream_id", &id);
            },
            |d| {
                d.put("internal_name", &name)
                    .put("stream_name", format!("live+{name}"))
                    .put("protocol", "RTMP")
                    .put("hostname", &hostname)
                    .put("latitude", p.2)
                    .put("longitude", p.3)
                    .put("stream_id", &id);
            },
        );
    }

    fn emit_tracks(&mut self, s: usize) {
        let st = &self.streams[s];
        let (tenant, node, tier) = (st.tenant, st.node, TIERS[st.tier]);
        let (name, id) = (st.name.clone(), st.id.clone());
        self.event(
            ("stream_track_list", "track_list", "LIVE_TRACK_LIST"),
            "track-list",
            tenant,
            Some(node),
            |o| {
                o.str("stream_name", &format!("live+{name}"))
                    .num("total_tracks", 2)
                    .num("video_track_count", 1)
                    .num("audio_track_count", 1)
                    .str("quality_tier", tier.0)
                    .num("primary_height", tier.1)
                    .num("primary_width", tier.1 * 16 / 9)
                    .num("primary_fps", tier.2)
                    .num("primary_video_bitrate", tier.3 as f64)
                    .str("primary_video_codec", "H264")
                    .str("stream_id", &id);
            },
            |d| {
                d.put("internal_name", &name)
                    .put("quality_tier", tier.0)
                    .put("primary_height", tier.1)
                    .put("track_count", 2)
                    .put("stream_id", &id);
            },
        );
    }

    fn emit_stream_update(&mut self, s: usize) {
        let elapsed = (self.clock - self.streams[s].started_at).max(0);
        let st = &mut self.streams[s];
        let tier = TIERS[st.tier];
        st.ingested = (elapsed as f64 / 1000.0 * tier.3 as f64 / 8.0 * 1.05) as u64;
        st.packets = (elapsed / 1000) as u64 * (tier.3 / 8 / 1316);
        if self.rng.chance(0.3) {
            self.streams[s].lost += self.rng.below(20) as u64;
        }
        let st = &self.streams[s];
        let (tenant, node, name, id) = (st.tenant, st.node, st.name.clone(), st.id.clone());
        let node_id = self.nodes[node].id.clone();
        let (viewers, dry, ingested, packets, lost) = (
            st.viewers,
            st.dry,
            st.ingested,
            st.packets,
            st.lost.min(st.packets),
        );
        let delivered = st.delivered;
        let started = st.started_at / SECOND;
        let bitrate = (tier.3 as f64 * (0.9 + 0.2 * self.rng.unit())) as u64;
        let fps = if dry {
            0.0
        } else {
            tier.2 - self.rng.below(2) as f64 * 0.03
        };
        let buffer = if dry { "DRY" } else { "FULL" };
        self.event(
            (
                "stream_lifecycle_update",
                "stream_lifecycle_update",
                "STREAM_LIFECYCLE_UPDATE",
            ),
            "stream-lifecycle",
            tenant,
            Some(node),
            |o| {
                o.str("node_id", &node_id)
                    .str("internal_name", &name)
                    .str("status", "live")
                    .str("buffer_state", buffer)
                    .int64("uploaded_bytes", ingested as i64)
                    .int64("downloaded_bytes", delivered as i64)
                    .num("total_viewers", viewers)
                    .num("total_inputs", 1)
                    .flag("has_issues", dry)
                    .str("quality_tier", tier.0)
                    .num("primary_width", tier.1 * 16 / 9)
                    .num("primary_height", tier.1)
                    .num("primary_fps", fps)
                    .num("primary_bitrate", bitrate as f64)
                    .int64("packets_sent", packets as i64)
                    .int64("packets_lost", lost as i64)
                    .int64("started_at", started)
                    .str("stream_id", &id);
            },
            |d| {
                d.put("internal_name", &name)
                    .put("status", "live")
                    .put("buffer_state", buffer)
                    .put("bandwidth_in", ingested)
                    .put("bandwidth_out", delivered)
                    .put("viewers", viewers)
                    .put("inputs", 1)
                    .put("has_issues", dry)
                    .put("quality_tier", tier.0)
                    .put("primary_height", tier.1)
                    .put("primary_fps", fps)
                    .put("primary_bitrate", bitrate)
                    .put("packets_sent", packets)
                    .put("packets_lost", lost)
                    .put("started_at", started)
                    .put("stream_id", &id);
            },
        );
    }

    fn emit_buffer(&mut self, s: usize, state: &'static str, issues: bool) {
        let st = &self.streams[s];
        let (tenant, node, name, id) = (st.tenant, st.node, st.name.clone(), st.id.clone());
        self.event(
            ("stream_buffer", "stream_buffer", "STREAM_BUFFER"),
            "stream-buffer",
            tenant,
            Some(node),
            |o| {
                o.str("stream_name", &format!("live+{name}"))
                    .str("buffer_state", state)
                    .flag("has_issues", issues)
                    .str_opt(
                        "issues_description",
                        if issues { "buffer ran dry" } else { "" },
                    )
                    .num("track_count", 2)
                    .str("stream_id", &id);
            },
            |d| {
                d.put("internal_name", &name)
                    .put("buffer_state", state)
                    .put("has_issues", issues)
                    .put("stream_id", &id);
            },
        );
    }

    fn emit_end(&mut self, s: usize) {
        let st = &self.streams[s];
        let (tenant, node, name, id) = (st.tenant, st.node, st.name.clone(), st.id.clone());
        let (down, up, total) = (st.delivered, st.ingested, st.total_viewers);
        self.event(
            ("stream_end", "stream_end", "STREAM_END"),
            "stream-end",
            tenant,
            Some(node),
            |o| {
                o.str("stream_name", &format!("live+{name}"))
                    .int64("downloaded_bytes", down as i64)
                    .int64("uploaded_bytes", up as i64)
                    .int64("total_viewers", i64::from(total))
                    .int64("total_inputs", 1)
                    .str("stream_id", &id);
            },
            |d| {
                d.put("internal_name", &name)
                    .put("status", "offline")
                    .put("downloaded_bytes", down)
                    .put("uploaded_bytes", up)
                    .put("stream_id", &id);
            },
        );
    }

    /// The node's stream map as version 2 carries it: every live stream ingested on the node
    /// (one input) or watched there (replicated from its origin), with its viewers on the node.
    fn node_stream_map(&self, n: usize) -> String {
        let mut viewers: BTreeMap<usize, u64> = BTreeMap::new();
        for session in self.sessions.iter().filter(|x| x.open && x.node == n) {
            *viewers.entry(session.stream).or_default() += 1;
        }
        for (s, stream) in self.streams.iter().enumerate() {
            if stream.live && stream.node == n {
                viewers.entry(s).or_default();
            }
        }
        let entries: Vec<String> = viewers
            .into_iter()
            .map(|(s, total)| {
                let stream = &self.streams[s];
                let origin = stream.node == n;
                format!(
                    r#""live+{}":{{"total":{total},"inputs":{},"bandwidth":450000,"replicated":{}}}"#,
                    stream.name,
                    u8::from(origin && stream.live),
                    !origin
                )
            })
            .collect();
        format!("{{{}}}", entries.join(","))
    }

    fn emit_node_update(&mut self, n: usize) {
        let node = &self.nodes[n];
        let p = PLACES[node.place];
        let viewers = node.viewers;
        let active = self
            .streams
            .iter()
            .filter(|s| s.live && s.node == n)
            .count() as u32;
        let load = f64::from(viewers) / node.capacity;
        let cpu = ((40.0 + load * 600.0 + self.rng.unit() * 30.0) as u32).min(1000);
        let up_speed = u64::from(viewers) * VIEWER_BYTES_PER_S;
        let ram = (node.ram_max as f64 * (0.25 + 0.5 * load.min(1.0))) as u64;
        let (id, url, bw, ram_max) = (
            node.id.clone(),
            node.base_url.clone(),
            node.bw_limit,
            node.ram_max,
        );
        let healthy = cpu < 950;
        let stream_map = self.node_stream_map(n);
        self.event(
            (
                "node_lifecycle_update",
                "node_lifecycle_update",
                "NODE_LIFECYCLE_UPDATE",
            ),
            "node-lifecycle",
            0,
            Some(n),
            |o| {
                o.str("node_id", &id)
                    .num("cpu_tenths", cpu)
                    .int64("ram_max", ram_max as i64)
                    .int64("ram_current", ram as i64)
                    .int64("up_speed", up_speed as i64)
                    .int64("down_speed", (up_speed / 50) as i64)
                    .int64("bw_limit", bw as i64)
                    .num("latitude", p.2)
                    .num("longitude", p.3)
                    .str("location", p.1)
                    .num("active_streams", active)
                    .str("base_url", &url)
                    .flag("is_healthy", healthy)
                    .str("operational_mode", "NODE_OPERATIONAL_MODE_NORMAL")
                    .raw(
                        "capabilities",
                        r#"{"ingest":true,"edge":true,"roles":["edge","ingest"]}"#,
                    )
                    .num("connections_current", viewers)
                    .raw("streams", &stream_map);
            },
            |d| {
                d.put("base_url", &url)
                    .put("is_healthy", healthy)
                    .put("latitude", p.2)
                    .put("longitude", p.3)
                    .put("location", p.1)
                    .put("cpu_usage", cpu)
                    .put("ram_max", ram_max)
                    .put("ram_current", ram)
                    .put("up_speed", up_speed)
                    .put("down_speed", up_speed / 50)
                    .put("bw_limit", bw)
                    .put("stream_count", active);
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_routing(
        &mut self,
        s: usize,
        node: usize,
        place: usize,
        lat: f64,
        lon: f64,
        km: f64,
        ok: bool,
        score: u64,
    ) {
        let st = &self.streams[s];
        let (name, id) = (st.name.clone(), st.id.clone());
        let stream_tenant = self.tenants[st.tenant].id.clone();
        let n = &self.nodes[node];
        let (node_id, node_url) = (n.id.clone(), n.base_url.clone());
        let np = PLACES[n.place];
        let status = if ok { "success" } else { "failed" };
        let km = (km * 1000.0).round() / 1000.0;
        let country = PLACES[place].0;
        self.event(
            ("load_balancing", "load_balancing_data", "LOAD_BALANCING"),
            "load-balancing",
            0,
            None,
            |o| {
                o.str("selected_node", &node_url)
                    .num("latitude", lat)
                    .num("longitude", lon)
                    .str("status", status)
                    .str("details", if ok { "" } else { "no node with capacity" })
                    .int64("score", score as i64)
                    .str("client_country", country)
                    .num("node_latitude", np.2)
                    .num("node_longitude", np.3)
                    .str("selected_node_id", &node_id)
                    .num("routing_distance_km", km)
                    .str("internal_name", &name)
                    .str("stream_tenant_id", &stream_tenant)
                    .str("stream_id", &id)
                    .num("candidates_count", 3)
                    .str("event_type", "play_rewrite")
                    .str("source", "http");
            },
            |d| {
                d.put("internal_name", &name)
                    .put("selected_node", &node_url)
                    .put("selected_node_id", &node_id)
                    .put("status", status)
                    .put("score", score)
                    .put("client_latitude", lat)
                    .put("client_longitude", lon)
                    .put("client_country", country)
                    .put("node_latitude", np.2)
                    .put("node_longitude", np.3)
                    .put("routing_distance_km", km)
                    .put("stream_id", &id);
            },
        );
    }

    fn emit_connect(&mut self, slot: usize) {
        self.emit_viewer(slot, None);
    }

    fn emit_disconnect(&mut self, slot: usize, duration_s: i64, up: u64, down: u64) {
        self.emit_viewer(slot, Some((duration_s, up, down)));
    }

    /// A viewer's connect (`ending` is `None`) or disconnect (duration, bytes up, bytes down),
    /// with the field names each wire version and trigger use.
    fn emit_viewer(&mut self, slot: usize, ending: Option<(i64, u64, u64)>) {
        let x = &self.sessions[slot];
        let st = &self.streams[x.stream];
        let (tenant, node, name, stream_id) = (st.tenant, x.node, st.name.clone(), st.id.clone());
        let p = PLACES[x.place];
        let (id, host, connector) = (x.id.clone(), x.host.clone(), x.connector);
        let (lat, lon) = (x.latitude, x.longitude);
        let (v2_type, trigger) = match ending {
            None => ("viewer_connect", "USER_NEW"),
            Some(_) => ("viewer_disconnect", "USER_END"),
        };
        self.event(
            (v2_type, v2_type, trigger),
            "user-connection",
            tenant,
            Some(node),
            |o| {
                o.str("stream_name", &format!("live+{name}"))
                    .str("host", &host)
                    .str("connector", connector)
                    .str("session_id", &id);
                match ending {
                    None => o
                        .str("client_country", p.0)
                        .str("client_city", p.1)
                        .num("client_latitude", lat)
                        .num("client_longitude", lon),
                    Some((duration, up, down)) => o
                        .int64("duration", duration)
                        .int64("up_bytes", up as i64)
                        .int64("down_bytes", down as i64)
                        .str("country_code", p.0)
                        .str("city", p.1)
                        .num("latitude", lat)
                        .num("longitude", lon)
                        .int64("seconds_connected", duration),
                };
                o.str("stream_id", &stream_id);
            },
            |d| {
                d.put(
                    "action",
                    if ending.is_none() {
                        "connect"
                    } else {
                        "disconnect"
                    },
                )
                .put("internal_name", &name)
                .put("stream_name", format!("live+{name}"))
                .put("session_id", &id)
                .put("connection_addr", &host)
                .put("connector", connector)
                .put("country_code", p.0)
                .put("city", p.1)
                .put("latitude", lat)
                .put("longitude", lon)
                .put("stream_id", &stream_id);
                if let Some((duration, up, down)) = ending {
                    d.put("down_bytes", down)
                        .put("up_bytes", up)
                        .put("seconds_connected", duration);
                }
            },
        );
    }

    fn emit_unknown(&mut self) {
        let tenant = self.rng.below(self.tenants.len());
        let kind = UNKNOWN_TYPES[self.rng.below(UNKNOWN_TYPES.len())];
        let id = self.rng.uuid().to_string();
        let mut out = self.buffer();
        let tenant_id = self.tenants[tenant].id.clone();
        let mut o = Obj::open(&mut out);
        o.str("event_id", &id)
            .str("event_type", kind)
            .time("timestamp", self.clock)
            .str("source", "foghorn")
            .str("tenant_id", &tenant_id)
            .num("schema_version", 2)
            .obj("data", |d| {
                d.str("tenant_id", &tenant_id).int64("total_bytes", 1 << 30);
            });
        o.close();
        self.push(kind, tenant, out, id);
    }

    /// A broken record, shaped after the good one it follows.
    fn malformed(&mut self, good: &SimRecord, bytes: &[u8]) -> (SimRecord, Vec<u8>) {
        let mut record = SimRecord {
            event_type: good.event_type,
            tenant_id: good.tenant_id.clone(),
            event_id: format!("{:032x}", self.bad_rng.u64()),
            source: good.source,
            time: good.time,
        };
        let text = String::from_utf8_lossy(bytes).into_owned();
        let out = match self.bad_rng.below(6) {
            0 => {
                let cut = 1 + self.bad_rng.below(bytes.len().saturating_sub(2).max(1));
                bytes[..cut].to_vec()
            }
            1 => {
                record.tenant_id = "acme-corp".to_owned();
                text.replace(&good.tenant_id, "acme-corp").into_bytes()
            }
            2 => {
                let t = keel_operators::time::format_rfc3339(good.time);
                text.replacen(&t, "last tuesday", 1).into_bytes()
            }
            3 => {
                record.event_type = "";
                b"\x00\x01GET /metrics HTTP/1.1".to_vec()
            }
            4 => {
                record.tenant_id.clear();
                format!(
                    r#"{{"event_type":"viewer_connect","timestamp":"{}","data":{{"viewer_connect":{{"stream_name":"live+orphan","session_id":"1"}}}}}}"#,
                    keel_operators::time::format_rfc3339(good.time)
                )
                .into_bytes()
            }
            _ => {
                record.event_type = "viewer_disconnect";
                format!(
                    r#"{{"event_id":"{}","event_type":"viewer_disconnect","timestamp":"{}","tenant_id":"{}","schema_version":2,"data":{{"viewer_disconnect":{{"stream_name":"live+x","session_id":"9","up_bytes":"-42"}}}}}}"#,
                    Uuid::from_u128(u128::from(self.bad_rng.u64())),
                    keel_operators::time::format_rfc3339(good.time),
                    good.tenant_id
                )
                .into_bytes()
            }
        };
        (record, out)
    }
}
