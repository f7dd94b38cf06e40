//! The mesh between real hosts: three network namespaces, each running `keel mesh join` with a
//! TUN device, joined by veth pairs to a fourth that runs the control plane. The nodes ping
//! each other's mesh addresses and names (through the mesh DNS each agent serves), `keel mesh
//! status` shows the handshakes, and a revoked node is cut off.
//!
//! It needs root, `ip` (iproute2), `ping` (iputils-ping) and `/dev/net/tun`; CI has them. Where
//! one is missing the test fails and says which.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ip(args: &[&str]) {
    let out = run("ip", args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
}

/// What the test needs from the machine, checked first so a failure names it.
fn check_machine() {
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the mesh's TUN devices need it (modprobe tun, or pass the \
         device into the container)"
    );
    let id = run("id", &["-u"]);
    assert_eq!(
        text(&id.stdout).trim(),
        "0",
        "this test makes network namespaces and TUN devices: run it as root (CI does)"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` (Debian iproute2) is missing"
    );
    assert!(
        Command::new("ping").arg("-V").output().is_ok(),
        "`ping` is missing: install Debian iputils-ping (scripts/test-servers.sh does)"
    );
}

/// The namespaces, their resolver files and the processes in them; all removed on drop.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

const CONTROL: &str = "10.231.0.1";

impl Lab {
    /// A hub namespace with a bridge at 10.231.0.1/24 and `nodes` namespaces, each on a veth
    /// pair into the bridge at 10.231.0.(10+n), loopback up, resolving through 127.0.0.1.
    fn new(nodes: usize) -> Lab {
        check_machine();
        // Unique per lab: tests of this file run side by side in one process.
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let lab = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("keel{}x{lab}", std::process::id());
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let hub = lab.ns("hub");
        let out = run("ip", &["netns", "add", &hub]);
        assert!(
            out.status.success(),
            "cannot make a network namespace ({}): this test needs root and namespace support",
            text(&out.stderr).trim()
        );
        lab.namespaces.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{CONTROL}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for n in 1..=nodes {
            let ns = lab.ns(&format!("n{n}"));
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let port = format!("h{n}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.0.{}/24", 10 + n),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // `ip netns exec` puts this file in place of /etc/resolv.conf.
            std::fs::create_dir_all(format!("/etc/netns/{ns}")).unwrap();
            std::fs::write(
                format!("/etc/netns/{ns}/resolv.conf"),
                "nameserver 127.0.0.1\n",
            )
            .unwrap();
        }
        lab
    }

    /// Starts the control plane in the hub and joins `nodes` nodes (`node-N`, state in
    /// `nodeN`, log `nodeN.log`); their mesh addresses.
    fn mesh(&mut self, nodes: usize) -> Vec<String> {
        let hub = self.ns("hub");
        let control = self.path("control");
        let control = control.to_str().unwrap().to_owned();
        let listen = format!("{CONTROL}:18012");
        let endpoint = format!("{CONTROL}:51820");
        self.spawn(
            &hub,
            &[
                "mesh",
                "serve",
                "--data-dir",
                &control,
                "--listen",
                &listen,
                "--endpoint",
                &endpoint,
            ],
            "control.log",
        );
        self.wait_for_log("control.log", "listening on", Duration::from_secs(20));
        let url = format!("http://{listen}");
        let uses = nodes.to_string();
        let out = self
            .keel(
                &hub,
                &[
                    "mesh",
                    "token",
                    "create",
                    "--data-dir",
                    &control,
                    "--uses",
                    &uses,
                    "--ttl",
                    "10m",
                    "--endpoint",
                    &endpoint,
                    "--control-url",
                    &url,
                ],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let token = text(&out.stdout).trim().to_owned();
        for n in 1..=nodes {
            let ns = self.ns(&format!("n{n}"));
            let dir = self.path(&format!("node{n}"));
            self.spawn(
                &ns,
                &[
                    "mesh",
                    "join",
                    "--token",
                    &token,
                    "--name",
                    &format!("node-{n}"),
                    "--endpoint",
                    &format!("10.231.0.{}:51820", 10 + n),
                    "--node-dir",
                    dir.to_str().unwrap(),
                ],
                &format!("node{n}.log"),
            );
            self.wait_for_log(&format!("node{n}.log"), "mesh up", Duration::from_secs(20));
        }
        (1..=nodes).map(|n| address_of(self, n)).collect()
    }

    /// `keel mesh status` of node `n` once its agent has reported (it does every 2 s).
    fn status(&self, n: usize) -> String {
        std::thread::sleep(Duration::from_millis(2_500));
        let dir = self.path(&format!("node{n}"));
        let out = self
            .keel(
                &self.ns(&format!("n{n}")),
                &["mesh", "status", "--node-dir", dir.to_str().unwrap()],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Stops node `n`'s agent (started by [`Lab::mesh`]) and starts it again from its state
    /// with `extra` options; its new log.
    fn restart(&mut self, n: usize, extra: &[&str]) -> String {
        let child = &mut self.children[n];
        let _ = child.kill();
        child.wait().unwrap();
        let dir = self.path(&format!("node{n}"));
        let log = format!("node{n}-again.log");
        let mut args = vec!["mesh", "join", "--node-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.spawn(&self.ns(&format!("n{n}")), &args, &log);
        self.wait_for_log(&log, "mesh up", Duration::from_secs(20));
        self.log(&log)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `keel ARGS` inside namespace `ns`.
    fn keel(&self, ns: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_keel")])
            .args(args)
            .env_remove("KEEL_MESH_JOIN_TOKEN")
            .env_remove("KEEL_MESH_DIR")
            .env_remove("KEEL_MESH_NODE_DIR")
            .env_remove("KEEL_MESH_CONTROL_URL")
            .env_remove("KEEL_MESH_ENDPOINT");
        command
    }

    /// Starts `keel ARGS` in `ns`, its output to `log`.
    fn spawn(&mut self, ns: &str, args: &[&str], log: &str) {
        let file = std::fs::File::create(self.path(log)).unwrap();
        let child = self
            .keel(ns, args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.path(log)).unwrap_or_default()
    }

    /// Waits until `log` contains `needle`.
    fn wait_for_log(&self, log: &str, needle: &str, within: Duration) {
        let start = Instant::now();
        while !self.log(log).contains(needle) {
            assert!(
                start.elapsed() < within,
                "{log} did not say {needle:?} within {within:?}:\n{}",
                self.log(log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Pings `target` once from `ns`; whether it answered.
fn ping(ns: &str, target: &str) -> bool {
    run(
        "ip",
        &["netns", "exec", ns, "ping", "-c", "1", "-W", "1", target],
    )
    .status
    .success()
}

/// Waits until `ns` can ping `target`.
fn ping_within(ns: &str, target: &str, within: Duration) {
    let start = Instant::now();
    while !ping(ns, target) {
        assert!(
            start.elapsed() < within,
            "{ns} could not ping {target} within {within:?}"
        );
    }
}

/// Receives one TCP connection on port 7000 and prints the SHA-256 of what came.
const RECEIVE: &str = "import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7000)); s.listen(1); s.settimeout(30)
c, _ = s.accept(); h = hashlib.sha256()
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b)
print(h.hexdigest())";

/// Sends 32 MiB of varied bytes to port 7000 of argv[1] and prints their SHA-256.
const SEND: &str = "import hashlib, socket, sys
h = hashlib.sha256(); c = socket.create_connection((sys.argv[1], 7000), timeout=30)
for i in range(512):
    b = hashlib.sha512(str(i).encode()).digest() * 1024
    h.update(b); c.sendall(b)
c.close(); print(h.hexdigest())";

fn address_of(lab: &Lab, node: usize) -> String {
    let enrollment: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.path(&format!("node{node}")).join("enrollment.json")).unwrap(),
    )
    .unwrap();
    enrollment["identity"]["node"]["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn three_namespaces_join_ping_by_name_and_a_revoked_node_is_cut_off() {
    let mut lab = Lab::new(3);
    let hub = lab.ns("hub");
    let control = lab.path("control");
    let control = control.to_str().unwrap().to_owned();
    let addresses = lab.mesh(3);
    let (n1, n2, n3) = (lab.ns("n1"), lab.ns("n2"), lab.ns("n3"));

    // Every node reaches every other by address; the first learnt of the later two by sync.
    for (from, to) in [(&n1, 2), (&n1, 3), (&n2, 3), (&n3, 1), (&n2, 1)] {
        ping_within(from, &addresses[to - 1], Duration::from_secs(10));
    }
    // And by name, through the mesh DNS its own agent serves on 127.0.0.1:53.
    for (from, to) in [(&n1, 3), (&n3, 2), (&n2, 1)] {
        ping_within(
            from,
            &format!("node-{to}.internal"),
            Duration::from_secs(10),
        );
    }
    let resolved = run(
        "ip",
        &["netns", "exec", &n1, "getent", "hosts", "node-2.internal"],
    );
    assert!(
        text(&resolved.stdout).starts_with(&addresses[1]),
        "node-2.internal resolved to {:?}, not {}",
        text(&resolved.stdout),
        addresses[1]
    );
    assert!(
        !run(
            "ip",
            &["netns", "exec", &n1, "getent", "hosts", "node-9.internal"]
        )
        .status
        .success(),
        "an unknown mesh name resolved"
    );

    // A bulk TCP transfer (segmentation offloads on the TUN device and the UDP socket) arrives
    // byte for byte.
    let receiver = Command::new("ip")
        .args(["netns", "exec", &n2, "python3", "-c", RECEIVE])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = run(
        "ip",
        &["netns", "exec", &n1, "python3", "-c", SEND, &addresses[1]],
    );
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let received = receiver.wait_with_output().unwrap();
    assert_eq!(
        text(&received.stdout).trim(),
        text(&sent.stdout).trim(),
        "the bytes received through the tunnel differ from those sent"
    );
    assert!(text(&sent.stdout).trim().len() == 64);

    // Status shows the running agent, a handshake and traffic with each peer.
    let shown = lab.status(1);
    assert!(shown.contains("agent: running"), "{shown}");
    for peer in ["node-2", "node-3"] {
        let line = shown
            .lines()
            .find(|l| l.starts_with(peer))
            .unwrap_or_else(|| panic!("{peer} missing from\n{shown}"));
        assert!(line.contains(" s ago"), "no handshake with {peer}: {line}");
        assert!(!line.contains("none yet"), "{line}");
    }

    // Revoke node-3: the others drop it as the change is pushed, and it loses every peer.
    let out = lab
        .keel(
            &hub,
            &["mesh", "revoke-node", "--data-dir", &control, "node-3"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    lab.wait_for_log(
        "node3.log",
        "this node was revoked",
        Duration::from_secs(10),
    );
    let cut_off = Instant::now();
    while ping(&n1, &addresses[2]) || ping(&n3, &addresses[1]) {
        assert!(
            cut_off.elapsed() < Duration::from_secs(10),
            "the revoked node-3 still exchanges packets"
        );
    }
    let known: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.path("node3").join("last-known-peers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(known["peers"], serde_json::json!([]), "{known}");
    // The remaining two still talk.
    ping_within(&n1, "node-2.internal", Duration::from_secs(5));

    // With the control plane gone, a restarted agent comes up from its last known peers.
    lab.children[0].kill().unwrap();
    lab.children[0].wait().unwrap();
    let log = lab.restart(1, &[]);
    assert!(log.contains("1 peer;"), "{log}");
    ping_within(&n1, "node-2.internal", Duration::from_secs(10));
    ping_within(&n2, &addresses[0], Duration::from_secs(10));
}

#[test]
fn without_the_privilege_the_join_is_kept_and_the_agent_says_what_is_missing() {
    use std::io::BufRead as _;
    check_machine();
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    let node = dir.path().join("node");
    let keel = env!("CARGO_BIN_EXE_keel");
    let mut serve = Command::new(keel)
        .args(["mesh", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&control)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(serve.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve ended").unwrap();
        if let Some((_, url)) = line.split_once("listening on ") {
            break url.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let token = Command::new(keel)
        .args(["mesh", "token", "create", "--data-dir"])
        .arg(&control)
        .output()
        .unwrap();
    let token = text(&token.stdout).trim().to_owned();
    let enrolled = Command::new(keel)
        .args(["mesh", "join", "--token", &token, "--name", "edge-1"])
        .args(["--control", &url, "--enroll-only", "--node-dir"])
        .arg(&node)
        .output()
        .unwrap();
    assert!(enrolled.status.success(), "{}", text(&enrolled.stderr));
    let owned = run("chown", &["-R", "65534:65534", node.to_str().unwrap()]);
    assert!(owned.status.success(), "{}", text(&owned.stderr));
    // As nobody, without capabilities: the agent cannot make its TUN device.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            keel,
            "mesh",
            "join",
            "--dns",
            "off",
            "--listen",
            "127.0.0.1:0",
            "--node-dir",
        ])
        .arg(&node)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("already in the mesh: edge-1"), "{stderr}");
    assert!(
        stderr.contains("cannot make TUN device keel0")
            && (stderr.contains("CAP_NET_ADMIN") || stderr.contains("/dev/net/tun")),
        "{stderr}"
    );
    assert!(stderr.contains("The join is kept"), "{stderr}");
    assert!(node.join("enrollment.json").exists());
}

#[test]
fn on_a_smaller_underlay_mtu_refused_datagrams_show_and_mtu_fixes_them() {
    let mut lab = Lab::new(2);
    let n1 = lab.ns("n1");
    // The first node's underlay carries 1400 bytes: the default tunnel MTU (1420) is too big.
    ip(&["-n", &n1, "link", "set", "eth0", "mtu", "1400"]);
    let addresses = lab.mesh(2);
    ping_within(&n1, &addresses[1], Duration::from_secs(10));
    let big = |from: &str, to: &str| {
        run(
            "ip",
            &[
                "netns", "exec", from, "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1350", to,
            ],
        )
        .status
        .success()
    };
    assert!(
        !big(&n1, &addresses[1]),
        "a 1378-byte packet crossed a 1400-byte underlay inside WireGuard"
    );
    let shown = lab.status(1);
    assert!(
        shown.contains("refused by the kernel (too big for the underlay?"),
        "{shown}"
    );
    // Restarted with the underlay's MTU less 80, the same packet goes through.
    for n in 1..=2 {
        lab.restart(n, &["--mtu", "1320"]);
    }
    ping_within(&n1, &addresses[1], Duration::from_secs(10));
    assert!(
        !big(&n1, &addresses[1]),
        "a packet above the interface's MTU was sent whole"
    );
    let fits = run(
        "ip",
        &[
            "netns",
            "exec",
            &n1,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1290",
            &addresses[1],
        ],
    );
    assert!(fits.status.success(), "{}", text(&fits.stdout));
}
