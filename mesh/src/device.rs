//! The node's TUN device: the mesh address on an interface of its own (`keel0` by default),
//! with the cluster's range routed into it, read and written by the tunnel loop.
//!
//! Making a TUN device needs `/dev/net/tun` and the `CAP_NET_ADMIN` capability; when either is
//! missing the error says which and how to get it.

use std::net::Ipv4Addr;

use crate::tunnel::Interface;

/// The interface's MTU: 1500 less WireGuard's 80 bytes of overhead over IPv6, as `wg-quick`
/// picks.
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

/// A TUN device carrying the mesh's packets.
pub struct TunDevice {
    device: tun_rs::AsyncDevice,
    name: String,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TunDevice {
    /// Makes interface `name` with `address/prefix`, MTU [`MTU`], up. The kernel routes the
    /// prefix's range into it.
    pub fn open(name: &str, address: Ipv4Addr, prefix: u8) -> Result<Self, DeviceError> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(DeviceError::NoTun {
                name: name.to_owned(),
            });
        }
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(address, prefix, None)
            .mtu(MTU)
            .enable(true)
            .build_async()
            .map_err(|source| match source.raw_os_error() {
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
            })?;
        Ok(TunDevice {
            device,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Interface for TunDevice {
    async fn recv(&mut self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        self.device.recv(buffer).await.map(Some)
    }

    async fn send(&mut self, packet: &[u8]) -> bool {
        match self.device.send(packet).await {
            Ok(_) => true,
            // A packet the kernel will not take (e.g. malformed) is dropped, not fatal.
            Err(e) => e.kind() != std::io::ErrorKind::BrokenPipe,
        }
    }
}
