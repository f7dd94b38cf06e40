//! The data plane: WireGuard tunnels (boringtun) between this node and its peers.
//!
//! [`Router`] is the tunnel state without any I/O: packets from the node's interface go in
//! through [`Router::outbound`] (the peer is chosen by the destination address among the peers'
//! allowed addresses, then encrypted), datagrams from the network through [`Router::inbound`]
//! (the peer is found from the handshake's static key or the session index, decrypted, and the
//! inner packet delivered only if its source address is one the peer is allowed to use — a
//! packet from any other source is dropped and counted). [`run`] drives a router with a UDP
//! socket and an [`Interface`]: a TUN device, or a pair of channels in tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::keys::WireguardKey;

/// Room for any datagram: the largest IP packet plus WireGuard's overhead.
const BUFFER: usize = 65_535 + 32;

/// An IPv4 range a peer may use, `a.b.c.d/n` (a node's own address is a `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedIp {
    network: u32,
    prefix: u8,
}

impl std::fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

impl AllowedIp {
    /// Parses `a.b.c.d/n` (or a bare address, a `/32`).
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let address: Ipv4Addr = address.trim().parse().ok()?;
        let prefix: u8 = prefix.trim().parse().ok().filter(|p| *p <= 32)?;
        Some(AllowedIp {
            network: u32::from(address) & Self::mask(prefix),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    /// Whether `address` lies in the range.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & Self::mask(self.prefix) == self.network
    }
}

/// A peer as the tunnel needs it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Its name (for status and logs).
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: [u8; 32],
    /// Where to send to it, until it is heard from elsewhere.
    pub endpoint: Option<SocketAddr>,
    /// The addresses it may use.
    pub allowed: Vec<AllowedIp>,
    /// Keepalive interval in seconds, to hold NAT mappings open.
    pub keepalive: Option<u16>,
}

/// What the tunnel counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TunnelStats {
    /// Packets from the interface sent encrypted to a peer.
    pub sent: u64,
    /// Packets from peers delivered to the interface.
    pub delivered: u64,
    /// Packets from the interface for an address no peer may use (or a peer with no endpoint).
    pub no_route: u64,
    /// Decrypted packets whose source address their peer may not use.
    pub bad_source: u64,
    /// Datagrams from keys or sessions this node does not know.
    pub unknown_peer: u64,
    /// Datagrams that are not WireGuard or failed to decrypt, and device reads that could not
    /// be split into packets.
    pub invalid: u64,
    /// Datagrams the kernel would not send: too big for the underlay (they go with "don't
    /// fragment"; a smaller `--mtu` fixes it) or otherwise refused.
    #[serde(default)]
    pub refused: u64,
}

/// One peer's tunnel as `keel mesh status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// The peer's name.
    pub name: String,
    /// Where its packets go (the last address it was heard from, else its registered one).
    pub endpoint: Option<String>,
    /// The addresses it may use.
    pub allowed: Vec<String>,
    /// Seconds since the last completed handshake; none before the first.
    pub handshake_secs_ago: Option<u64>,
    /// Bytes sent to it through the tunnel (WireGuard payload).
    pub sent_bytes: u64,
    /// Bytes received from it.
    pub received_bytes: u64,
}

/// Something the router wants done, its bytes in [`Outputs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to that address.
    Network(SocketAddr, std::ops::Range<usize>),
    /// Hand these bytes (a packet) to the interface.
    Device(std::ops::Range<usize>),
}

/// What the router wants done for a burst: the datagrams and packets, their bytes one after
/// another in one buffer kept from burst to burst (so a burst allocates nothing, and the
/// datagrams for one peer lie side by side, ready to leave in one segmented send).
#[derive(Debug, Default)]
pub struct Outputs {
    bytes: Vec<u8>,
    items: Vec<Output>,
}

/// Room a datagram may need beyond its packet: WireGuard's header, tag and padding, or a whole
/// handshake message.
const OVERHEAD: usize = 32 + 16;
const SMALLEST: usize = 256;

impl Outputs {
    /// Empties it, keeping the buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// What to do, in order.
    pub fn items(&self) -> &[Output] {
        &self.items
    }

    /// The bytes of `range`.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.bytes[range]
    }

    /// Lets `write` fill up to `room` bytes at the end; what it wrote becomes a datagram for
    /// the address it names, or a packet for the device without one. Nothing when it wrote
    /// nothing.
    fn push(
        &mut self,
        room: usize,
        write: impl FnOnce(&mut [u8]) -> Option<(usize, Option<SocketAddr>)>,
    ) {
        let start = self.bytes.len();
        self.bytes.resize(start + room.max(SMALLEST), 0);
        match write(&mut self.bytes[start..]) {
            Some((len, to)) => {
                self.bytes.truncate(start + len);
                self.items.push(match to {
                    Some(to) => Output::Network(to, start..start + len),
                    None => Output::Device(start..start + len),
                });
            }
            None => self.bytes.truncate(start),
        }
    }
}

struct Slot {
    spec: PeerSpec,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    /// When the last handshake completed, as last seen (boringtun forgets it when sessions
    /// expire).
    last_handshake: Option<std::time::Instant>,
}

/// One node's tunnels to its peers.
pub struct Router {
    secret: StaticSecret,
    public: PublicKey,
    peers: Vec<Option<Slot>>,
    stats: TunnelStats,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("peers", &self.peer_names())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The destination address of an IPv4 packet.
fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

impl Router {
    /// A router for the node with `key`, talking to `peers`.
    pub fn new(key: &WireguardKey, peers: Vec<PeerSpec>) -> Self {
        let secret = key.secret().clone();
        let public = PublicKey::from(&secret);
        let mut router = Router {
            secret,
            public,
            peers: Vec::new(),
            stats: TunnelStats::default(),
        };
        router.set_peers(peers);
        router
    }

    /// Replaces the peer list. Peers that stay (same key) keep their slot and sessions; peers
    /// that go lose theirs at once, so a revoked node cannot exchange another packet.
    pub fn set_peers(&mut self, peers: Vec<PeerSpec>) {
        for slot in &mut self.peers {
            if slot
                .as_ref()
                .is_some_and(|s| !peers.iter().any(|p| p.public_key == s.spec.public_key))
            {
                *slot = None;
            }
        }
        for spec in peers {
            if let Some(slot) = self
                .peers
                .iter_mut()
                .flatten()
                .find(|s| s.spec.public_key == spec.public_key)
            {
                slot.endpoint = slot.endpoint.or(spec.endpoint);
                slot.spec = spec;
                continue;
            }
            // The session index names the slot: a new peer takes a free slot or a new one.
            let index = self
                .peers
                .iter()
                .position(Option::is_none)
                .unwrap_or(self.peers.len());
            let slot = Slot {
                tunn: Tunn::new(
                    self.secret.clone(),
                    PublicKey::from(spec.public_key),
                    None,
                    spec.keepalive,
                    u32::try_from(index).expect("fewer than 2^24 peers"),
                    None,
                ),
                endpoint: spec.endpoint,
                last_handshake: None,
                spec,
            };
            if index == self.peers.len() {
                self.peers.push(Some(slot));
            } else {
                self.peers[index] = Some(slot);
            }
        }
    }

    /// The peers' names, in slot order.
    pub fn peer_names(&self) -> Vec<String> {
        self.peers
            .iter()
            .flatten()
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// What the router counted so far.
    pub fn stats(&self) -> TunnelStats {
        self.stats
    }

    /// Each peer's endpoint, last handshake and traffic, by slot.
    pub fn peer_status(&mut self) -> Vec<PeerStatus> {
        self.peers
            .iter_mut()
            .flatten()
            .map(|s| {
                let (handshake, sent, received, _, _) = s.tunn.stats();
                if let Some(ago) = handshake {
                    s.last_handshake = std::time::Instant::now().checked_sub(ago);
                }
                PeerStatus {
                    name: s.spec.name.clone(),
                    endpoint: s.endpoint.map(|e| e.to_string()),
                    allowed: s.spec.allowed.iter().map(ToString::to_string).collect(),
                    handshake_secs_ago: s.last_handshake.map(|t| t.elapsed().as_secs()),
                    sent_bytes: sent as u64,
                    received_bytes: received as u64,
                }
            })
            .collect()
    }

    /// A packet from the interface: encrypted for the peer that may receive its destination.
    pub fn outbound(&mut self, packet: &[u8], out: &mut Outputs) {
        let Some(destination) = destination(packet) else {
            self.stats.no_route += 1;
            return;
        };
        let peer = self.peers.iter_mut().flatten().find(|slot| {
            slot.spec
                .allowed
                .iter()
                .any(|range| range.contains(destination))
        });
        let Some(slot) = peer else {
            self.stats.no_route += 1;
            return;
        };
        let Some(endpoint) = slot.endpoint else {
            self.stats.no_route += 1;
            return;
        };
        let stats = &mut self.stats;
        out.push(packet.len() + OVERHEAD, |room| {
            match slot.tunn.encapsulate(packet, room) {
                TunnResult::WriteToNetwork(datagram) => {
                    stats.sent += 1;
                    Some((datagram.len(), Some(endpoint)))
                }
                // Queued until the handshake completes.
                TunnResult::Done => {
                    stats.sent += 1;
                    None
                }
                _ => {
                    stats.invalid += 1;
                    None
                }
            }
        });
    }

    /// The slot a datagram belongs to.
    fn slot_of(&self, datagram: &[u8]) -> Result<Option<usize>, ()> {
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, &init) else {
                    return Ok(None);
                };
                Ok(self.peers.iter().position(|slot| {
                    slot.as_ref()
                        .is_some_and(|s| s.spec.public_key == half.peer_static_public)
                }))
            }
            Ok(Packet::HandshakeResponse(p)) => Ok(Some((p.receiver_idx >> 8) as usize)),
            Ok(Packet::PacketCookieReply(p)) => Ok(Some((p.receiver_idx >> 8) as usize)),
            Ok(Packet::PacketData(p)) => Ok(Some((p.receiver_idx >> 8) as usize)),
            Err(_) => Err(()),
        }
    }

    /// A datagram from the network: handshakes answered, data decrypted and delivered when its
    /// source address is one its peer may use.
    pub fn inbound(&mut self, from: SocketAddr, datagram: &[u8], out: &mut Outputs) {
        let index = match self.slot_of(datagram) {
            Ok(Some(index)) if self.peers.get(index).is_some_and(Option::is_some) => index,
            Ok(_) => {
                self.stats.unknown_peer += 1;
                return;
            }
            Err(()) => {
                self.stats.invalid += 1;
                return;
            }
        };
        let slot = self.peers[index].as_mut().expect("checked");
        let stats = &mut self.stats;
        // Decrypted in place at the end of the outputs: a reply (handshake) goes back to the
        // sender, then packets queued behind the handshake follow; data goes to the device.
        let mut input: &[u8] = datagram;
        loop {
            let mut again = false;
            // Flushing what waited for the handshake may give a full-size data packet.
            let room = if input.is_empty() {
                BUFFER
            } else {
                input.len() + OVERHEAD
            };
            out.push(room, |room| {
                match slot.tunn.decapsulate(Some(from.ip()), input, room) {
                    TunnResult::WriteToNetwork(reply) => {
                        slot.endpoint = Some(from);
                        again = true;
                        Some((reply.len(), Some(from)))
                    }
                    TunnResult::WriteToTunnelV4(packet, source) => {
                        if slot.spec.allowed.iter().any(|range| range.contains(source)) {
                            slot.endpoint = Some(from);
                            stats.delivered += 1;
                            Some((packet.len(), None))
                        } else {
                            stats.bad_source += 1;
                            None
                        }
                    }
                    TunnResult::WriteToTunnelV6(..) => {
                        stats.bad_source += 1;
                        None
                    }
                    TunnResult::Err(_) => {
                        stats.invalid += 1;
                        None
                    }
                    TunnResult::Done => None,
                }
            });
            if !again {
                break;
            }
            input = &[];
        }
    }

    /// Timers: handshake retries, rekeying and keepalives.
    pub fn tick(&mut self, out: &mut Outputs) {
        for slot in self.peers.iter_mut().flatten() {
            let Some(endpoint) = slot.endpoint else {
                continue;
            };
            out.push(SMALLEST, |room| match slot.tunn.update_timers(room) {
                TunnResult::WriteToNetwork(datagram) => Some((datagram.len(), Some(endpoint))),
                _ => None,
            });
        }
    }
}

/// A shared router, so status and peer updates can reach it while [`run`] drives it.
pub type SharedRouter = Arc<Mutex<Router>>;

/// Room kept in front of every packet handed to an [`Interface`], for a device's own header
/// (a TUN device with offloads writes its 10-byte virtio header there).
pub const HEADROOM: usize = 16;

/// The errors that mean the kernel would not send a datagram (Linux numbers): too big for the
/// interface, a segmented send it will not do, an I/O error from the device.
const EMSGSIZE: i32 = 90;
const EINVAL: i32 = 22;
const EIO: i32 = 5;

/// Packets one device read may give.
const SEGMENTS: usize = 128;

/// The UDP socket's send and receive buffers, bytes.
const SOCKET_BUFFER: usize = 4 << 20;

/// Most datagrams taken from the socket in one go before their packets go to the interface
/// together (which lets a device coalesce them).
const BURST: usize = 64;

/// Packets read from the node in one go: each sits at [`HEADROOM`] in a buffer of its own.
#[derive(Debug)]
pub struct Batch {
    pub(crate) bufs: Vec<Vec<u8>>,
    pub(crate) sizes: Vec<usize>,
    pub(crate) count: usize,
    /// Reads the device could not split into the batch, dropped.
    pub(crate) dropped: u64,
}

impl Batch {
    /// Room for `slots` packets of up to `size` bytes each.
    pub fn new(slots: usize, size: usize) -> Self {
        Batch {
            bufs: vec![vec![0; HEADROOM + size]; slots.max(1)],
            sizes: vec![0; slots.max(1)],
            count: 0,
            dropped: 0,
        }
    }

    /// The packets read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.count]
            .iter()
            .zip(&self.sizes)
            .map(|(buf, &size)| &buf[HEADROOM..HEADROOM + size])
    }
}

/// The node's side of the tunnel: where cleartext packets come from and go to — a TUN device
/// ([`crate::device`]) or, in tests, a pair of channels.
pub trait Interface {
    /// Waits for packets from the node and puts them in `batch`; `false` when the interface
    /// is gone.
    fn recv(&mut self, batch: &mut Batch) -> impl Future<Output = std::io::Result<bool>>;
    /// Hands decrypted packets to the node, each at [`HEADROOM`] in its buffer (the buffers
    /// may be changed); `false` when the interface is gone.
    fn send(&mut self, packets: &mut [Vec<u8>]) -> impl Future<Output = bool>;
}

/// An interface made of two channels: packets from the node arrive on the receiver, packets
/// for it leave on the sender.
#[derive(Debug)]
pub struct Channels {
    /// Packets from the node.
    pub from_node: mpsc::Receiver<Vec<u8>>,
    /// Packets for the node.
    pub to_node: mpsc::Sender<Vec<u8>>,
}

impl Interface for Channels {
    async fn recv(&mut self, batch: &mut Batch) -> std::io::Result<bool> {
        let Some(packet) = self.from_node.recv().await else {
            return Ok(false);
        };
        let buf = &mut batch.bufs[0];
        buf.truncate(HEADROOM);
        buf.extend_from_slice(&packet);
        batch.sizes[0] = packet.len();
        batch.count = 1;
        Ok(true)
    }

    async fn send(&mut self, packets: &mut [Vec<u8>]) -> bool {
        for packet in packets.iter() {
            if self
                .to_node
                .send(packet[HEADROOM..].to_vec())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

/// Drives `router` until the interface closes: datagrams from `socket` and packets from the
/// interface go through it, decrypted packets go back to the interface, and timers tick every
/// 250 ms. Work is done in bursts — all the packets one device read gave, or the datagrams
/// waiting on the socket (up to 64 reads) — under one lock of the router; a burst's decrypted
/// packets go to the interface together, and its datagrams for one peer leave in one send
/// where the kernel offers UDP segmentation (GSO), as they arrive coalesced where it offers
/// GRO.
pub async fn run<I: Interface>(
    router: SharedRouter,
    socket: UdpSocket,
    mut interface: I,
) -> std::io::Result<()> {
    let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
    // Bursts of segmented datagrams overflow the default buffers (and then TCP inside the
    // tunnel backs off); the kernel caps these at net.core.{r,w}mem_max.
    let _ = udp.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = udp.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    let mut received = vec![0u8; 4 * BUFFER];
    // As many packets as a 64 KiB segment splits into at any MSS down to 536 bytes.
    let mut batch = Batch::new(SEGMENTS, BUFFER);
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    let mut outputs = Outputs::default();
    let mut to_node: Vec<Vec<u8>> = Vec::new();
    let mut waiting = 0;
    loop {
        tokio::select! {
            ready = socket.readable() => {
                ready?;
                let mut router = router.lock().expect("router");
                for _ in 0..BURST {
                    let mut meta = [quinn_udp::RecvMeta::default()];
                    let read = socket.try_io(tokio::io::Interest::READABLE, || {
                        udp.recv(
                            (&socket).into(),
                            &mut [std::io::IoSliceMut::new(&mut received)],
                            &mut meta,
                        )
                    });
                    match read {
                        Ok(_) => {
                            let [meta] = meta;
                            let stride = meta.stride.max(1);
                            for datagram in received[..meta.len].chunks(stride) {
                                router.inbound(meta.addr, datagram, &mut outputs);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            read = interface.recv(&mut batch) => {
                if !read? {
                    return Ok(());
                }
                let mut router = router.lock().expect("router");
                router.stats.invalid += std::mem::take(&mut batch.dropped);
                for packet in batch.packets() {
                    router.outbound(packet, &mut outputs);
                }
            }
            _ = ticks.tick() => router.lock().expect("router").tick(&mut outputs),
        }
        let items = outputs.items();
        let mut next = 0;
        while next < items.len() {
            match &items[next] {
                Output::Network(to, first) => {
                    // Same-peer datagrams of one size (the last may be shorter) lie side by
                    // side in the buffer: they go as one segmented send.
                    let size = first.len();
                    let mut end = first.end;
                    let mut count = 1;
                    next += 1;
                    while count < udp.max_gso_segments()
                        && end - first.start + size <= 65_000
                        && let Some(Output::Network(next_to, range)) = items.get(next)
                        && next_to == to
                        && range.start == end
                        && range.len() <= size
                    {
                        end = range.end;
                        count += 1;
                        next += 1;
                        if range.len() < size {
                            break;
                        }
                    }
                    let transmit = quinn_udp::Transmit {
                        destination: *to,
                        ecn: None,
                        contents: outputs.bytes(first.start..end),
                        segment_size: (count > 1).then_some(size),
                        src_ip: None,
                    };
                    // A peer that is away is WireGuard's to retry, not ours; a datagram the
                    // kernel refuses (too big for the underlay, say) is counted.
                    let mut refused = false;
                    let _ = socket
                        .async_io(tokio::io::Interest::WRITABLE, || {
                            match udp.try_send((&socket).into(), &transmit) {
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
                                Err(e) => {
                                    refused =
                                        matches!(e.raw_os_error(), Some(EMSGSIZE | EINVAL | EIO));
                                    Ok(())
                                }
                                Ok(()) => Ok(()),
                            }
                        })
                        .await;
                    if refused {
                        router.lock().expect("router").stats.refused += count as u64;
                    }
                }
                Output::Device(range) => {
                    next += 1;
                    // Buffers are kept from burst to burst.
                    if to_node.len() == waiting {
                        to_node.push(Vec::with_capacity(HEADROOM + BUFFER));
                    }
                    let buf = &mut to_node[waiting];
                    buf.clear();
                    buf.resize(HEADROOM, 0);
                    buf.extend_from_slice(outputs.bytes(range.clone()));
                    waiting += 1;
                }
            }
        }
        outputs.clear();
        if waiting > 0 {
            if !interface.send(&mut to_node[..waiting]).await {
                return Ok(());
            }
            waiting = 0;
            // Keep buffers for one full burst, no more.
            to_node.truncate(SEGMENTS);
        }
    }
}

/// The peer specs for a node's peer list from the registry.
pub fn peer_specs(peers: &[crate::registry::Peer]) -> Vec<PeerSpec> {
    use base64::Engine as _;
    peers
        .iter()
        .filter_map(|peer| {
            let key: [u8; 32] = base64::engine::general_purpose::STANDARD
                .decode(&peer.public_key)
                .ok()?
                .try_into()
                .ok()?;
            Some(PeerSpec {
                name: peer.name.clone(),
                public_key: key,
                endpoint: peer
                    .endpoint
                    .as_deref()
                    .and_then(|e| e.parse::<SocketAddr>().ok()),
                allowed: peer
                    .allowed_ips
                    .iter()
                    .filter_map(|a| AllowedIp::parse(a))
                    .collect(),
                keepalive: Some(25),
            })
        })
        .collect()
}

/// A minimal IPv4/UDP packet from `source` to `destination` carrying `payload` (for tests and
/// probes; checksums left zero, which UDP over IPv4 allows).
pub fn udp_packet(source: Ipv4Addr, destination: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&u16::try_from(total).expect("fits").to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    packet.extend_from_slice(&40_000u16.to_be_bytes());
    packet.extend_from_slice(&40_001u16.to_be_bytes());
    packet.extend_from_slice(
        &u16::try_from(8 + payload.len())
            .expect("fits")
            .to_be_bytes(),
    );
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    packet
}

/// The source address of an IPv4 packet.
pub fn source(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]))
}
