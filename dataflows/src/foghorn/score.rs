//! The balancer's formula: what one node scores for one request, or why it is rejected.
//!
//! This is the platform's port of MistServer's load balancer, in the same unsigned integer
//! arithmetic (see the module docs of [`super`] for the formula). [`score_node`] is the one
//! place it is written; the fleet's fast path ([`super::fleet`]) calls it for every node it
//! cannot rule out by an upper bound, so both always agree.

use keel_operators::sym::Sym;
use keel_sources::event::NodeMode;
use serde::{Deserialize, Serialize};

use super::NodeLoad;

/// The symbol for a name from a request. Names no event has ever carried are not interned
/// (requests come from the public, and interned text lives for good): they all become one
/// placeholder that no node carries, which answers the same as the name would.
pub fn known(name: &str) -> Sym {
    Sym::find(name).unwrap_or_else(unknown)
}

/// The one symbol [`known`] gives for every name nothing carries.
fn unknown() -> Sym {
    static UNKNOWN: std::sync::OnceLock<Sym> = std::sync::OnceLock::new();
    *UNKNOWN.get_or_init(|| Sym::new("\u{1}unknown"))
}

/// True for a symbol [`known`] made from a name nothing carries.
pub fn is_unknown(sym: Sym) -> bool {
    sym == unknown()
}

fn edge() -> Sym {
    static EDGE: std::sync::OnceLock<Sym> = std::sync::OnceLock::new();
    *EDGE.get_or_init(|| Sym::new("edge"))
}

fn ingest() -> Sym {
    static INGEST: std::sync::OnceLock<Sym> = std::sync::OnceLock::new();
    *INGEST.get_or_init(|| Sym::new("ingest"))
}

/// Degrees per radian, as the platform writes it.
pub const DEGREES_PER_RADIAN: f64 = 57.295_779_513_082_32;
/// Bandwidth limit of a node that reports none: 128 MiB/s ("1 Gbps").
pub const DEFAULT_BW_LIMIT: u64 = 128 * 1024 * 1024;

/// The weights of the score's terms (`/?weights=` reads and sets them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    /// CPU term.
    pub cpu: u64,
    /// RAM term.
    pub ram: u64,
    /// Bandwidth term.
    pub bw: u64,
    /// Distance term.
    pub geo: u64,
    /// Bonus for a node that already carries the stream.
    pub bonus: u64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            cpu: 500,
            ram: 500,
            bw: 1000,
            geo: 1000,
            bonus: 50,
        }
    }
}

/// Opt-in hard limits: a node above any of them gets no new viewers, unless every candidate is
/// above them, in which case the plain gradient decides (and the fallback is counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cutoff {
    /// CPU use above this percentage excludes a node.
    pub cpu_percent: Option<f64>,
    /// RAM use above this percentage excludes a node.
    pub ram_percent: Option<f64>,
    /// Bandwidth use (upload plus pending viewers, of the limit) above this percentage.
    pub bw_percent: Option<f64>,
}

impl Cutoff {
    /// True when no limit is set (the platform's behaviour).
    pub fn is_off(&self) -> bool {
        self.cpu_percent.is_none() && self.ram_percent.is_none() && self.bw_percent.is_none()
    }

    fn excludes(&self, node: &NodeLoad) -> bool {
        let over = |limit: Option<f64>, used: f64, max: f64| {
            limit.is_some_and(|limit| max > 0.0 && used * 100.0 > limit * max)
        };
        over(self.cpu_percent, f64::from(node.cpu_tenths), 1000.0)
            || over(
                self.ram_percent,
                node.ram_current as f64,
                node.ram_max as f64,
            )
            || over(
                self.bw_percent,
                node.up_speed.saturating_add(node.add_bandwidth) as f64,
                node.bw_limit() as f64,
            )
    }
}

/// What a request is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Purpose {
    /// A viewer playing a stream (or any stream when none is named).
    View,
    /// A node pulling the stream from its origin (`/?source=`).
    Source,
    /// A new ingest expected to add this much CPU, percent (`/?ingest=`).
    Ingest(f64),
}

/// A tag adjustment: `adjust` is added when the node has any of `tags`, or, when `invert`,
/// when it has none of them.
#[derive(Clone, Debug, PartialEq)]
pub struct TagAdjust {
    /// Tags matched (lower-case).
    pub tags: Vec<Sym>,
    /// A leading `-`: applies to nodes without the tags.
    pub invert: bool,
    /// Added to the score.
    pub adjust: i64,
}

impl TagAdjust {
    /// One adjustment from its key (`"tag1,tag2"`, or `"-tag"` for nodes without it).
    pub fn new(key: &str, adjust: i64) -> Result<TagAdjust, String> {
        if adjust.unsigned_abs() > MAX_TAG_ADJUST.unsigned_abs() {
            return Err(format!(
                "tag adjustment {key:?}: {adjust} is past ±{MAX_TAG_ADJUST}"
            ));
        }
        let (invert, list) = match key.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, key),
        };
        let tags: Vec<Sym> = list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| known(&t.to_ascii_lowercase()))
            .collect();
        if tags.is_empty() {
            return Err(format!("tag adjustment {key:?} names no tag"));
        }
        Ok(TagAdjust {
            tags,
            invert,
            adjust,
        })
    }
}

/// The largest adjustment one tag key may make, as large as a weight may be: adjustments
/// summed past `i64` wrapped a score around (and panicked a debug build).
pub const MAX_TAG_ADJUST: i64 = 1_000_000;

/// The most tag keys one request may adjust: each is tested against every candidate node.
pub const MAX_TAG_ADJUSTMENTS: usize = 64;

/// Refuses more than [`MAX_TAG_ADJUSTMENTS`] keys.
pub fn check_tag_count(count: usize) -> Result<(), String> {
    if count > MAX_TAG_ADJUSTMENTS {
        return Err(format!(
            "{count} tag adjustments: at most {MAX_TAG_ADJUSTMENTS} in one request"
        ));
    }
    Ok(())
}

/// Reads the platform's tag-adjust JSON, `{"tag1,tag2": 100, "-tag3": -50}`.
pub fn parse_tag_adjust(text: &str) -> Result<Vec<TagAdjust>, String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("tag adjustments must be a JSON object of numbers: {e}"))?;
    check_tag_count(map.len())?;
    let mut adjustments = Vec::with_capacity(map.len());
    for (key, value) in map {
        let adjust = value
            .as_i64()
            .ok_or_else(|| format!("tag adjustment {key:?}: {value} is not an integer"))?;
        adjustments.push(TagAdjust::new(&key, adjust)?);
    }
    Ok(adjustments)
}

/// Client coordinates, when valid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Place {
    /// Latitude, degrees.
    pub latitude: f64,
    /// Longitude, degrees.
    pub longitude: f64,
}

impl Place {
    /// Great-circle distance to `other` in km (as the platform's analytics compute it).
    pub fn distance_km(self, other: Place) -> f64 {
        keel_sources::event::great_circle_km(
            self.latitude,
            self.longitude,
            other.latitude,
            other.longitude,
        )
    }

    /// Checks the range: latitude within ±90, longitude within ±180, both finite.
    pub fn new(latitude: f64, longitude: f64) -> Result<Place, String> {
        if !(latitude.is_finite() && (-90.0..=90.0).contains(&latitude)) {
            return Err(format!("latitude {latitude} is not between -90 and 90"));
        }
        if !(longitude.is_finite() && (-180.0..=180.0).contains(&longitude)) {
            return Err(format!("longitude {longitude} is not between -180 and 180"));
        }
        Ok(Place {
            latitude,
            longitude,
        })
    }
}

/// One routing question.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The stream, when one is named (internal name, no prefix).
    pub stream: Option<Sym>,
    /// What the node is wanted for.
    pub purpose: Purpose,
    /// Where the client is.
    pub client: Option<Place>,
    /// Tag adjustments.
    pub tags: Vec<TagAdjust>,
    /// A capability every candidate must have (`edge`, `ingest`, a role...), when asked.
    pub capability: Option<Sym>,
}

impl Request {
    /// A viewer request for `stream`.
    pub fn view(stream: Option<&str>, client: Option<Place>) -> Request {
        Request {
            stream: stream.map(known),
            purpose: Purpose::View,
            client,
            tags: Vec::new(),
            capability: None,
        }
    }

    /// The capability a node must advertise (when it advertises any) to serve the request.
    pub fn needed_capability(&self) -> Option<Sym> {
        self.capability.or(match self.purpose {
            Purpose::View => Some(edge()),
            Purpose::Ingest(_) => Some(ingest()),
            Purpose::Source => None,
        })
    }
}

/// Why a node cannot take a request. The order is the order of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// No RAM or bandwidth figures ("host invalid").
    Invalid,
    /// No heartbeat for 90 s of event time.
    Stale,
    /// The node reports itself unhealthy.
    Unhealthy,
    /// In maintenance or draining.
    Mode,
    /// Lacks the capability the request needs.
    Capability,
    /// Source selection: the stream is not there, has no input, or is itself replicated.
    NoOrigin,
    /// Ingest: the expected CPU would reach 100 %.
    Full,
    /// Upload plus pending viewers reach the bandwidth limit.
    Bandwidth,
    /// Above an opt-in utilisation cutoff.
    Cutoff,
}

/// The terms of one node's score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// CPU term.
    pub cpu: u64,
    /// RAM term.
    pub ram: u64,
    /// Bandwidth term.
    pub bw: u64,
    /// Distance term.
    pub geo: u64,
    /// Stream bonus.
    pub bonus: u64,
    /// Sum of the tag adjustments that applied.
    pub tags: i64,
    /// The score: the terms' sum plus the adjustments, never below 0.
    pub total: u64,
}

/// The static terms (cpu, ram, bw) of a node, which depend on the node and the weights only.
/// `None` when the node cannot take anyone (no RAM figure, no bandwidth left).
pub fn static_terms(node: &NodeLoad, w: &Weights) -> Result<(u64, u64, u64), Reject> {
    let bw_limit = node.bw_limit();
    if node.ram_max == 0 || bw_limit == 0 {
        return Err(Reject::Invalid);
    }
    let used = node.up_speed.saturating_add(node.add_bandwidth);
    if used >= bw_limit {
        return Err(Reject::Bandwidth);
    }
    Ok(terms(node, w))
}

/// The static terms as they stand, without rejecting: a term whose figure is missing or
/// exhausted is 0 (for showing a node's state, not for routing).
pub fn terms(node: &NodeLoad, w: &Weights) -> (u64, u64, u64) {
    let bw_limit = node.bw_limit();
    let used = node.up_speed.saturating_add(node.add_bandwidth);
    let cpu = w
        .cpu
        .saturating_sub(u64::from(node.cpu_tenths).saturating_mul(w.cpu) / 1000);
    let ram = if node.ram_max == 0 {
        0
    } else {
        w.ram
            .saturating_sub(mul_div(node.ram_current, w.ram, node.ram_max))
    };
    let bw = if bw_limit == 0 {
        0
    } else {
        w.bw.saturating_sub(mul_div(used, w.bw, bw_limit))
    };
    (cpu, ram, bw)
}

/// `a * b / c` without overflow (the platform's uint64 product, widened).
fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    u64::try_from(u128::from(a) * u128::from(b) / u128::from(c)).unwrap_or(u64::MAX)
}

/// The geo term between the client and a node, from the sines and cosines of both positions
/// (radians): `W_geo − W_geo·d`, `d` the central angle over π.
#[inline]
pub fn geo_term(weight: u64, client: &Trig, node: &Trig) -> u64 {
    geo_of_cos(weight, cos_angle(client, node))
}

/// The cosine of the central angle between two positions.
#[inline]
pub fn cos_angle(client: &Trig, node: &Trig) -> f64 {
    let cos_dlon = client.cos_lon * node.cos_lon + client.sin_lon * node.sin_lon;
    client.sin_lat * node.sin_lat + client.cos_lat * node.cos_lat * cos_dlon
}

/// The geo term for the cosine of the central angle (see [`geo_term`]).
#[inline]
pub fn geo_of_cos(weight: u64, cos_angle: f64) -> u64 {
    let d = cos_angle.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    weight.saturating_sub((weight as f64 * d) as u64)
}

/// Cosines below which the geo term is surely smaller than a given value, so routing can pass
/// over a node that cannot win without taking its arc cosine.
///
/// The term is `W − ⌊W·d⌋`; it is below `g` exactly when `⌊W·d⌋ ≥ m = W − g + 1`, which holds
/// whenever the angle is at least `π·(m + δ)/W`, that is when the cosine is at most
/// `cos(π·(m + δ)/W)`. The table keeps that cosine for every `m`, lowered by a margin far
/// larger than the rounding of `acos` and of the product, so a pass is never wrong; a node
/// near the line is simply scored in full.
#[derive(Clone, Debug)]
pub struct GeoCuts {
    weight: u64,
    /// Index `m` in `1..W`: the cosine at or below which `⌊W·d⌋ ≥ m`. Index `W` only for the
    /// exact antipode, which is never passed over.
    cos: Box<[f64]>,
}

impl GeoCuts {
    /// Largest weight a table is made for; above it every node is scored in full.
    const MAX_WEIGHT: u64 = 1 << 16;

    /// The table for geo weight `weight`.
    pub fn new(weight: u64) -> GeoCuts {
        let size = if weight <= Self::MAX_WEIGHT {
            weight as usize + 1
        } else {
            0
        };
        let cos = (0..size)
            .map(|m| {
                if m == 0 {
                    f64::INFINITY
                } else if m as u64 == weight {
                    f64::NEG_INFINITY
                } else {
                    let angle = std::f64::consts::PI * (m as f64 + 1e-6) / weight as f64;
                    angle.cos() - 1e-12
                }
            })
            .collect();
        GeoCuts { weight, cos }
    }

    /// True when a node at cosine `cos_angle` surely has a geo term below `needed`.
    #[inline]
    pub fn surely_below(&self, cos_angle: f64, needed: u64) -> bool {
        if needed > self.weight {
            return true;
        }
        if needed == 0 {
            return false;
        }
        match self.cos.get((self.weight - needed + 1) as usize) {
            Some(&cut) => cos_angle <= cut,
            None => false,
        }
    }
}

/// Sines and cosines of a position, computed once per node and once per request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Trig {
    sin_lat: f64,
    cos_lat: f64,
    sin_lon: f64,
    cos_lon: f64,
}

impl Trig {
    /// The position as a unit vector (x towards 0°N 0°E, z towards the north pole).
    pub fn unit(&self) -> [f64; 3] {
        [
            self.cos_lat * self.cos_lon,
            self.cos_lat * self.sin_lon,
            self.sin_lat,
        ]
    }

    /// From degrees.
    pub fn new(latitude: f64, longitude: f64) -> Trig {
        let (lat, lon) = (
            latitude / DEGREES_PER_RADIAN,
            longitude / DEGREES_PER_RADIAN,
        );
        Trig {
            sin_lat: lat.sin(),
            cos_lat: lat.cos(),
            sin_lon: lon.sin(),
            cos_lon: lon.cos(),
        }
    }
}

/// The tag adjustments that apply to a node with `tags`.
pub fn tag_sum(adjustments: &[TagAdjust], tags: &[Sym]) -> i64 {
    adjustments
        .iter()
        .filter(|a| a.tags.iter().any(|t| tags.contains(t)) != a.invert)
        .map(|a| a.adjust)
        .sum()
}

/// Everything that rules a node out before its score matters, except the static terms.
pub fn check(
    node: &NodeLoad,
    request: &Request,
    watermark: i64,
    cutoff: &Cutoff,
) -> Result<(), Reject> {
    gate(node, watermark)?;
    check_request(node, request, cutoff)
}

/// The checks that do not depend on the request: fresh, healthy, in normal mode.
pub fn gate(node: &NodeLoad, watermark: i64) -> Result<(), Reject> {
    if node.is_stale(watermark) {
        return Err(Reject::Stale);
    }
    if !node.healthy {
        return Err(Reject::Unhealthy);
    }
    if node.mode != NodeMode::Normal {
        return Err(Reject::Mode);
    }
    Ok(())
}

/// The checks that depend on the request: capability, origin, ingest headroom, cutoff.
pub fn check_request(node: &NodeLoad, request: &Request, cutoff: &Cutoff) -> Result<(), Reject> {
    if let Some(cap) = request.needed_capability()
        && !node.capabilities.is_empty()
        && !node.capabilities.contains(&cap)
    {
        return Err(Reject::Capability);
    }
    match request.purpose {
        Purpose::Source => {
            let origin = request
                .stream
                .and_then(|s| node.stream(s))
                .is_some_and(|s| s.inputs > 0 && !s.replicated);
            if !origin {
                return Err(Reject::NoOrigin);
            }
        }
        Purpose::Ingest(cpu_percent) => {
            if f64::from(node.cpu_tenths) + cpu_percent * 10.0 >= 1000.0 {
                return Err(Reject::Full);
            }
        }
        Purpose::View => {}
    }
    if !cutoff.is_off() && cutoff.excludes(node) {
        return Err(Reject::Cutoff);
    }
    Ok(())
}

/// The whole score of one node for one request, or why it cannot take it. `cutoff` may be
/// [`Cutoff::default`] to score without the opt-in limits.
pub fn score_node(
    node: &NodeLoad,
    request: &Request,
    weights: &Weights,
    watermark: i64,
    cutoff: &Cutoff,
) -> Result<Breakdown, Reject> {
    let (cpu, ram, bw) = static_terms(node, weights)?;
    check(node, request, watermark, cutoff)?;
    let geo = match (request.client, node.place()) {
        (Some(c), Some(n)) => geo_term(
            weights.geo,
            &Trig::new(c.latitude, c.longitude),
            &Trig::new(n.latitude, n.longitude),
        ),
        _ => 0,
    };
    let bonus = match request.stream {
        Some(s) if node.stream(s).is_some() => weights.bonus,
        _ => 0,
    };
    let tags = tag_sum(&request.tags, &node.capabilities);
    Ok(finish(cpu, ram, bw, geo, bonus, tags))
}

/// Adds the terms up.
pub fn finish(cpu: u64, ram: u64, bw: u64, geo: u64, bonus: u64, tags: i64) -> Breakdown {
    let sum = cpu + ram + bw + geo + bonus;
    let total = if tags >= 0 {
        sum.saturating_add(tags.unsigned_abs())
    } else {
        sum.saturating_sub(tags.unsigned_abs())
    };
    Breakdown {
        cpu,
        ram,
        bw,
        geo,
        bonus,
        tags,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_adjustments_parse_and_refuse_clearly() {
        // Tags are matched as symbols; only names some event carried exist as symbols.
        for tag in ["edge", "eu", "gpu"] {
            Sym::new(tag);
        }
        let adj = parse_tag_adjust(r#"{"edge, EU": 100, "-gpu": -50}"#).unwrap();
        assert_eq!(adj.len(), 2);
        assert!(adj.iter().any(|a| a.invert && a.adjust == -50));
        assert_eq!(tag_sum(&adj, &[Sym::new("eu")]), 50);
        assert_eq!(tag_sum(&adj, &[Sym::new("gpu")]), 0);
        assert_eq!(tag_sum(&adj, &[]), -50);
        for bad in ["[1]", "{\"a\": 1.5}", "{\"a\": \"x\"}", "{\",\": 1}", "{"] {
            assert!(parse_tag_adjust(bad).is_err(), "{bad}");
        }
        // Adjustments whose sum would pass i64 (and wrap the score) are refused, as are more
        // keys than a request may adjust.
        let huge = format!(r#"{{"-a": {}, "-b": {}}}"#, i64::MAX, i64::MAX);
        let error = parse_tag_adjust(&huge).unwrap_err();
        assert!(error.contains("is past ±1000000"), "{error}");
        assert!(parse_tag_adjust(r#"{"-a": -1000000, "-b": 1000000}"#).is_ok());
        let many: Vec<String> = (0..65).map(|i| format!("\"t{i}\": 1")).collect();
        let error = parse_tag_adjust(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(error.contains("at most 64"), "{error}");
    }

    #[test]
    fn places_are_range_checked() {
        assert!(Place::new(52.0, 4.0).is_ok());
        for (lat, lon) in [
            (91.0, 0.0),
            (0.0, 181.0),
            (f64::NAN, 0.0),
            (0.0, f64::INFINITY),
        ] {
            assert!(Place::new(lat, lon).is_err());
        }
    }

    #[test]
    fn geo_cuts_never_pass_over_a_node_that_reaches_the_bar() {
        use std::f64::consts::PI;
        for weight in [1, 7, 1000, 1024, 65_536, 1 << 20] {
            let cuts = GeoCuts::new(weight);
            // Angles off the round fractions of π, so few sit on a cut's edge.
            let spread: Vec<f64> = (0..20_000)
                .map(|s| (PI * (f64::from(s) + 0.37) / 20_001.0).cos())
                .collect();
            let mut cosines = spread.clone();
            // On and beside the edge of every cut, where rounding decides.
            for m in 0..=weight.min(4096) {
                let c = (PI * m as f64 / weight as f64).cos();
                cosines.extend([c, c.next_up(), c.next_down()]);
            }
            cosines.extend([-1.5, -1.0, 0.0, 1.0, 1.5]);
            for &cos in &cosines {
                let geo = geo_of_cos(weight, cos);
                for needed in [0, 1, geo, geo + 1, geo + 2, weight, weight + 1] {
                    assert!(
                        !cuts.surely_below(cos, needed) || geo < needed,
                        "weight {weight}, cosine {cos}: term {geo} passed over for {needed}"
                    );
                }
            }
            // Away from the edges the cut is tight: one above the term is passed over.
            if weight <= GeoCuts::MAX_WEIGHT {
                let tight = spread
                    .iter()
                    .filter(|&&c| cuts.surely_below(c, geo_of_cos(weight, c) + 1))
                    .count();
                assert!(tight * 100 >= spread.len() * 99, "{weight}: {tight}");
            }
        }
    }

    #[test]
    fn geo_term_spans_same_place_to_antipode() {
        let here = Trig::new(52.0, 4.0);
        assert_eq!(geo_term(1000, &here, &here), 1000);
        // The antipode's angle comes out a hair under π: the term truncates to 0 or 1.
        assert!(geo_term(1000, &here, &Trig::new(-52.0, -176.0)) <= 1);
        let quarter = geo_term(1000, &Trig::new(0.0, 0.0), &Trig::new(0.0, 90.0));
        assert_eq!(quarter, 500);
    }
}
