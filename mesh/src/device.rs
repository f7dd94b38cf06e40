//! The node's TUN device: the mesh address on an interface of its own (`keel0` by default),
//! with the cluster's range routed into it, read and written by the tunnel loop.
//!
//! Making a TUN device needs `/dev/net/tun` and the `CAP_NET_ADMIN` capability; when either is
//! missing the error says which and how to get it.

use std::net::Ipv4Addr;

use crate::tunnel::{Batch, HEADROOM, Interface};

/// The interface's default MTU: 1500 less WireGuard's 80 bytes of overhead over IPv6, as
/// `wg-quick` picks. On an underlay with a smaller MTU, use that less 80: the tunnel's
/// datagrams are sent with "don't fragment", and larger ones are dropped by the kernel.
pub const MTU: u16 = 1420;

/// Why the TUN device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No `/dev/net/tun`.
    #[error(
        "cannot make TUN device {name}: /dev/net/tun is missing (load the tun module with \
         `modprobe tun`; in a container, pass the device in, e.g. `--device /dev/net/tun`)"
    )]
    NoTun {
        /// The interface asked for.
        name: String,
    },
    /// Not allowed to make the interface.
    #[error(
        "cannot make TUN device {name}: operation not permitted — it needs the CAP_NET_ADMIN \
         capability (run as root, or `setcap cap_net_admin+ep $(command -v keel)`)"
    )]
    NotPermitted {
        /// The interface asked for.
        name: String,
    },
    /// Not allowed to open `/dev/net/tun`.
    #[error(
        "cannot make TUN device {name}: /dev/net/tun cannot be opened by this user (permission \
         denied) — run as root, or give the user access to /dev/net/tun and the binary \
         CAP_NET_ADMIN"
    )]
    NoAccess {
        /// The interface asked for.
        name: String,
    },
    /// Anything else.
    #[error("cannot make TUN device {name}: {source}")]
    Other {
        /// The interface asked for.
        name: String,
        /// What the system said.
        source: std::io::Error,
    },
}

/// A TUN device carrying the mesh's packets. Where the kernel allows it the device runs with
/// offloads: a read may hand over one large TCP segment that is split here into packets of the
/// MTU, and packets written together are coalesced back into large segments, so the kernel's
/// TCP sees a few big packets instead of many small ones.
pub struct TunDevice {
    device: tun_rs::AsyncDevice,
    name: String,
    offload: bool,
    original: Vec<u8>,
    gro: tun_rs::GROTable,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

fn build(
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
    offload: bool,
) -> std::io::Result<tun_rs::AsyncDevice> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(address, prefix, None)
        .mtu(mtu)
        .offload(offload)
        .enable(true)
        .build_async()
}

impl TunDevice {
    /// Makes interface `name` with `address/prefix` and `mtu` (normally [`MTU`]), up, with
    /// offloads when the kernel has them. The kernel routes the prefix's range into it.
    pub fn open(name: &str, address: Ipv4Addr, prefix: u8, mtu: u16) -> Result<Self, DeviceError> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(DeviceError::NoTun {
                name: name.to_owned(),
            });
        }
        let (device, offload) = match build(name, address, prefix, mtu, true) {
            Ok(device) => (device, true),
            Err(first) => match build(name, address, prefix, mtu, false) {
                Ok(device) => (device, false),
                // The first error says more (permission, no module).
                Err(_) => return Err(classify(name, first)),
            },
        };
        Ok(TunDevice {
            device,
            name: name.to_owned(),
            offload,
            original: vec![0; tun_rs::VIRTIO_NET_HDR_LEN + 65_535],
            gro: tun_rs::GROTable::new(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device runs with offloads.
    pub fn offload(&self) -> bool {
        self.offload
    }
}

fn classify(name: &str, source: std::io::Error) -> DeviceError {
    match source.raw_os_error() {
        Some(1) => DeviceError::NotPermitted {
            name: name.to_owned(),
        },
        Some(13) => DeviceError::NoAccess {
            name: name.to_owned(),
        },
        _ => DeviceError::Other {
            name: name.to_owned(),
            source,
        },
    }
}

impl Interface for TunDevice {
    async fn recv(&mut self, batch: &mut Batch) -> std::io::Result<bool> {
        batch.count = 0;
        match self
            .device
            .recv_multiple(
                &mut self.original,
                &mut batch.bufs,
                &mut batch.sizes,
                HEADROOM,
            )
            .await
        {
            Ok(count) => batch.count = count,
            // A segment that cannot be split into the batch (say, one of a connection with a
            // tiny MSS) is dropped, as a NIC would; TCP sends it again smaller.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Other
                        | std::io::ErrorKind::InvalidInput
                        | std::io::ErrorKind::InvalidData
                ) =>
            {
                batch.dropped += 1;
            }
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    async fn send(&mut self, packets: &mut [Vec<u8>]) -> bool {
        match self
            .device
            .send_multiple(&mut self.gro, packets, HEADROOM)
            .await
        {
            Ok(_) => true,
            // A packet the kernel will not take (e.g. malformed) is dropped, not fatal.
            Err(e) => e.kind() != std::io::ErrorKind::BrokenPipe,
        }
    }
}
