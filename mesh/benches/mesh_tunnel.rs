//! Mesh benchmark (run as root; `scripts/bench-mesh` builds and runs it):
//!
//! 1. **Tunnel throughput**: two network namespaces joined by a veth pair, each running Keel's
//!    data plane (the TUN device and boringtun loop `keel mesh join` runs), and iperf3 over the
//!    tunnel beside iperf3 over the bare veth pair, alternating, in the same run.
//! 2. **Join to first ping**: with `KEEL_BIN` naming a `keel` binary, a control plane and one
//!    node already up, the time from starting `keel mesh join` on a second node to its first
//!    ping answered by the first, over several joins.
//!
//! Environment: `KEEL_BENCH_SECONDS` (per iperf3 run, default 5), `KEEL_BENCH_ROUNDS` (default
//! 3), `KEEL_BENCH_JOINS` (default 5), `KEEL_BIN`.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_mesh::device::TunDevice;
use keel_mesh::keys::WireguardKey;
use keel_mesh::tunnel::{AllowedIp, PeerSpec, Router, run};

/// Set in a child: run one tunnel node with this spec and nothing else.
const NODE_ENV: &str = "KEEL_BENCH_TUNNEL_NODE";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ip(args: &[&str]) {
    let out = sh("ip", args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
}

/// A tunnel node: `private_key address/prefix listen peer_public peer_endpoint peer_allowed`.
fn node(spec: &str) {
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [key, address, listen, peer, endpoint, allowed] = parts[..] else {
        panic!("bad {NODE_ENV}: {spec}");
    };
    let key = WireguardKey::from_base64(key).expect("key");
    let (address, prefix) = address.split_once('/').expect("address/prefix");
    let address: Ipv4Addr = address.parse().expect("address");
    let peer = WireguardKey::from_base64(peer).expect("peer key is given as a private key");
    let spec = PeerSpec {
        name: "peer".into(),
        public_key: *x25519_public(&peer).as_bytes(),
        endpoint: Some(endpoint.parse().expect("endpoint")),
        allowed: vec![AllowedIp::parse(allowed).expect("allowed")],
        keepalive: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let device = TunDevice::open(
            "keel0",
            address,
            prefix.parse().unwrap(),
            keel_mesh::device::MTU,
        )
        .unwrap();
        let socket = tokio::net::UdpSocket::bind(listen).await.unwrap();
        let router = Arc::new(Mutex::new(Router::new(&key, vec![spec])));
        eprintln!("ready (offload {})", device.offload());
        run(router, socket, device).await.unwrap();
    });
}

fn x25519_public(key: &WireguardKey) -> x25519_dalek::PublicKey {
    x25519_dalek::PublicKey::from(key.secret())
}

struct Lab {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

/// Waits for a child's first stderr line containing `needle`, and returns it.
fn wait_ready(child: &mut Child, needle: &str) -> String {
    use std::io::BufRead as _;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let found = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(needle) => break line,
            Some(Ok(_)) => {}
            other => panic!("the child ended before saying {needle:?}: {other:?}"),
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    found
}

/// iperf3 from namespace `ns` to `target` for `seconds`: bits per second received, and the
/// sender's retransmitted segments.
fn iperf(ns: &str, target: &str, seconds: u32) -> (f64, u64) {
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "iperf3",
            "-c",
            target,
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 to {target}: {e}: {}", text(&out.stderr)));
    let rate = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 to {target} reported no rate: {report}"));
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or_default();
    (rate, retransmits)
}

fn ping_once(ns: &str, target: &str) -> bool {
    sh(
        "ip",
        &["netns", "exec", ns, "ping", "-c", "1", "-W", "1", target],
    )
    .status
    .success()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if let Ok(spec) = std::env::var(NODE_ENV) {
        node(&spec);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing"
    );
    assert!(
        Command::new("iperf3").arg("-v").output().is_ok(),
        "iperf3 is missing (Debian iperf3; scripts/bench-mesh installs it)"
    );
    let seconds: u32 = env_or("KEEL_BENCH_SECONDS", 5);
    let rounds: usize = env_or("KEEL_BENCH_ROUNDS", 3);
    let prefix = format!("keelbench{}", std::process::id());
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let mut lab = Lab {
        namespaces: Vec::new(),
        children: Vec::new(),
    };
    for ns in [&a, &b] {
        ip(&["netns", "add", ns]);
        lab.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        // Each transfer starts afresh: no slow-start threshold remembered from an earlier
        // connection to the same address.
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_no_metrics_save=1",
            ],
        );
        assert!(out.status.success(), "sysctl: {}", text(&out.stderr));
    }
    ip(&[
        "-n", &a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", &b,
    ]);
    for (ns, address) in [(&a, "10.232.0.1/24"), (&b, "10.232.0.2/24")] {
        ip(&["-n", ns, "addr", "add", address, "dev", "veth0"]);
        ip(&["-n", ns, "link", "set", "veth0", "up"]);
    }
    let keys = [WireguardKey::generate(), WireguardKey::generate()];
    let me = std::env::current_exe().unwrap();
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let other = 1 - i;
        let spec = format!(
            "{} 10.89.0.{}/24 10.232.0.{}:51820 {} 10.232.0.{}:51820 10.89.0.{}/32",
            keys[i].private_base64(),
            i + 1,
            i + 1,
            keys[other].private_base64(),
            other + 1,
            other + 1
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&me)
            .env(NODE_ENV, spec)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        println!("node {}: {}", i + 1, wait_ready(&mut child, "ready"));
        lab.children.push(child);
    }
    let server = Command::new("ip")
        .args(["netns", "exec", &b, "iperf3", "-s"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    lab.children.push(server);
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    while !ping_once(&a, "10.89.0.2") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no ping through the tunnel"
        );
    }
    let (mut bare, mut tunnel) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (veth, veth_retransmits) = iperf(&a, "10.232.0.2", seconds);
        let (keel, keel_retransmits) = iperf(&a, "10.89.0.2", seconds);
        println!(
            "round {round}: bare veth {:.2} Gbit/s ({veth_retransmits} retransmits), Keel \
             tunnel {:.2} Gbit/s ({keel_retransmits} retransmits)",
            veth / 1e9,
            keel / 1e9
        );
        bare.push(veth);
        tunnel.push(keel);
    }
    let (bare, tunnel) = (median(bare), median(tunnel));
    println!(
        "tunnel throughput (median of {rounds} × {seconds} s, TCP, one stream): Keel \
         {:.2} Gbit/s, bare veth {:.2} Gbit/s, ratio {:.3}; target ≥ 1 Gbit/s: {}",
        tunnel / 1e9,
        bare / 1e9,
        tunnel / bare,
        if tunnel >= 1e9 { "met" } else { "NOT met" }
    );
    for child in &mut lab.children {
        let _ = child.kill();
        let _ = child.wait();
    }
    lab.children.clear();

    match std::env::var("KEEL_BIN") {
        Ok(keel) => join_to_ping(&keel, &a, &b, env_or("KEEL_BENCH_JOINS", 5), &mut lab),
        Err(_) => println!("join to first ping: skipped (set KEEL_BIN to a keel binary)"),
    }
}

/// Control plane and node-a in namespace `a`; `joins` fresh nodes in `b`, each timed from
/// starting `keel mesh join` to its first ping of node-a answered.
fn join_to_ping(keel: &str, a: &str, b: &str, joins: usize, lab: &mut Lab) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("control");
    let data = data.to_str().unwrap();
    let spawn = |ns: &str, args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", ns, keel])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut control = spawn(
        a,
        &[
            "mesh",
            "serve",
            "--data-dir",
            data,
            "--listen",
            "10.232.0.1:18012",
            "--endpoint",
            "10.232.0.1:51821",
        ],
    );
    wait_ready(&mut control, "listening on");
    lab.children.push(control);
    let uses = (joins + 1).to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", a, keel, "mesh", "token", "create"])
        .args(["--data-dir", data, "--uses", &uses, "--ttl", "1h"])
        .args(["--endpoint", "10.232.0.1:51821"])
        .args(["--control-url", "http://10.232.0.1:18012"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let node_dir = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let first_dir = node_dir("node-a");
    let mut first = spawn(
        a,
        &[
            "mesh",
            "join",
            "--token",
            &token,
            "--name",
            "node-a",
            "--endpoint",
            "10.232.0.1:51821",
            "--interface",
            "keel1",
            "--dns",
            "off",
            "--node-dir",
            &first_dir,
        ],
    );
    wait_ready(&mut first, "mesh up");
    lab.children.push(first);
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("node-a/enrollment.json")).unwrap())
            .unwrap();
    let target = enrollment["identity"]["node"]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut times = Vec::new();
    for n in 0..joins {
        let name = format!("node-b{n}");
        let node = node_dir(&name);
        let started = Instant::now();
        let mut child = spawn(
            b,
            &[
                "mesh",
                "join",
                "--token",
                &token,
                "--name",
                &name,
                "--endpoint",
                "10.232.0.2:51821",
                "--interface",
                "keel1",
                "--dns",
                "off",
                "--node-dir",
                &node,
            ],
        );
        while !ping_once(b, &target) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} never reached node-a"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = started.elapsed().as_secs_f64();
        println!(
            "join {}: {name} pinged node-a {took:.3} s after `keel mesh join` started",
            n + 1
        );
        times.push(took);
        let _ = child.kill();
        let _ = child.wait();
        // The next node has a new name and key at the same endpoint; node-a learns it by sync.
        let _ = Command::new("ip")
            .args(["netns", "exec", a, keel, "mesh", "revoke-node"])
            .args(["--data-dir", data, &name])
            .output();
    }
    let worst = times.iter().copied().fold(0.0, f64::max);
    println!(
        "join to first ping ({joins} joins): median {:.3} s, worst {worst:.3} s; target ≤ 2 s: {}",
        median(times),
        if worst <= 2.0 { "met" } else { "NOT met" }
    );
}
