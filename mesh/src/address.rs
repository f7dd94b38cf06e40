//! Mesh addresses: a cluster's IPv4 range and the deterministic choice of a node's address in it.
//!
//! A node's address depends only on its cluster, its host name and the addresses already
//! taken: the first four bytes of `sha256(cluster ‖ 0x00 ‖ host)`, read big-endian and reduced
//! modulo the range's size, give the starting offset; from there the search walks upwards
//! (wrapping) past the network address, the first host (kept for the range's gateway), the
//! broadcast address and every taken address. The same host joining the same cluster again gets
//! the same address as long as nobody else took it meanwhile.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The smallest range a cluster may have: a /28 leaves 13 usable addresses.
pub const LONGEST_PREFIX: u8 = 28;

/// A cluster's mesh range, such as `10.88.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshCidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a range was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// Not `A.B.C.D/N`.
    #[error("{0:?} is not an IPv4 range like 10.88.0.0/16")]
    Syntax(String),
    /// The prefix leaves too few addresses (or none at all).
    #[error("{0:?}: the prefix must be between /8 and /{LONGEST_PREFIX}")]
    Prefix(String),
    /// Host bits are set in the network address.
    #[error("{given:?} has host bits set: did you mean {network}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        network: MeshCidr,
    },
}

impl MeshCidr {
    /// The range `network/prefix`, checked as [`FromStr`] checks it.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        format!("{network}/{prefix}").parse()
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses the range spans, network and broadcast included.
    pub fn size(&self) -> u32 {
        1 << (32 - u32::from(self.prefix))
    }

    /// Whether `address` lies in the range.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(address) & mask == u32::from(self.network)
    }

    /// The address at `index` from the network address.
    fn at(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + index)
    }

    /// The first host, kept out of allocation for the range's gateway or bootstrap peer.
    pub fn gateway(&self) -> Ipv4Addr {
        self.at(1)
    }
}

impl fmt::Display for MeshCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for MeshCidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (address, prefix) = s.trim().split_once('/').ok_or_else(syntax)?;
        let address: Ipv4Addr = address.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(8..=LONGEST_PREFIX).contains(&prefix) {
            return Err(CidrError::Prefix(s.to_owned()));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = Ipv4Addr::from(u32::from(address) & mask);
        let cidr = MeshCidr { network, prefix };
        if network != address {
            return Err(CidrError::HostBits {
                given: s.to_owned(),
                network: cidr,
            });
        }
        Ok(cidr)
    }
}

/// Where the search for `host`'s address in `cluster` starts, as an index into a range of
/// `size` addresses.
pub fn start_offset(cluster: &str, host: &str, size: u32) -> u32 {
    let mut hash = Sha256::new();
    hash.update(cluster.as_bytes());
    hash.update([0u8]);
    hash.update(host.as_bytes());
    let digest = hash.finalize();
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    // `size` is a power of two no larger than 2^24, so this is `head mod size`.
    head & (size - 1)
}

/// The address for `host` in `cluster`'s range, or `None` when every usable address is taken.
pub fn allocate(
    cluster: &str,
    host: &str,
    cidr: MeshCidr,
    taken: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let size = cidr.size();
    let start = start_offset(cluster, host, size);
    (0..size)
        .map(|step| (start + step) & (size - 1))
        .filter(|&index| index > 1 && index < size - 1)
        .map(|index| cidr.at(index))
        .find(|address| !taken.contains(address))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ranges_parse_and_refuse_what_cannot_be_used() {
        let cidr: MeshCidr = "10.88.0.0/16".parse().unwrap();
        assert_eq!(cidr.size(), 65_536);
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert!(cidr.contains(Ipv4Addr::new(10, 88, 255, 254)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 89, 0, 1)));
        assert_eq!(
            "10.88.0.0/29".parse::<MeshCidr>(),
            Err(CidrError::Prefix("10.88.0.0/29".into()))
        );
        assert!(matches!(
            "10.88.1.0/16".parse::<MeshCidr>(),
            Err(CidrError::HostBits { network, .. }) if network.to_string() == "10.88.0.0/16"
        ));
        assert_eq!(
            "fd00::/64".parse::<MeshCidr>(),
            Err(CidrError::Syntax("fd00::/64".into()))
        );
    }

    #[test]
    fn the_offset_is_the_big_endian_head_of_the_hash() {
        // `printf 'prod\0edge-1' | sha256sum` begins 1d9eeb68: 496,954,216, which is 60,264
        // modulo 2^16 and 8 modulo 16.
        assert_eq!(start_offset("prod", "edge-1", 1 << 16), 60_264);
        assert_eq!(start_offset("prod", "edge-1", 16), 8);
        let cidr: MeshCidr = "10.88.0.0/16".parse().unwrap();
        assert_eq!(
            allocate("prod", "edge-1", cidr, &HashSet::new()),
            Some(Ipv4Addr::new(10, 88, 235, 104))
        );
        // Taken, the next one up.
        let taken = HashSet::from([Ipv4Addr::new(10, 88, 235, 104)]);
        assert_eq!(
            allocate("prod", "edge-1", cidr, &taken),
            Some(Ipv4Addr::new(10, 88, 235, 105))
        );
    }

    #[test]
    fn a_full_range_has_no_address_left() {
        let cidr: MeshCidr = "10.0.0.0/28".parse().unwrap();
        let mut taken = HashSet::new();
        for i in 0..13 {
            let address = allocate("c", &format!("h{i}"), cidr, &taken).expect("room left");
            assert!(taken.insert(address), "{address} handed out twice");
        }
        assert_eq!(allocate("c", "one-more", cidr, &taken), None);
    }

    proptest! {
        #[test]
        fn addresses_are_usable_unique_and_deterministic(
            prefix in 20u8..=28,
            hosts in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 1..40),
        ) {
            let cidr = MeshCidr::new(Ipv4Addr::new(10, 88, 0, 0), prefix).unwrap();
            let mut taken = HashSet::new();
            for host in &hosts {
                let Some(address) = allocate("prod", host, cidr, &taken) else {
                    // Only a full range may refuse.
                    prop_assert_eq!(taken.len() as u32, cidr.size() - 3);
                    continue;
                };
                prop_assert!(cidr.contains(address));
                prop_assert!(address != cidr.network() && address != cidr.gateway());
                prop_assert!(u32::from(address) != u32::from(cidr.network()) + cidr.size() - 1);
                // The same question asked again gets the same answer.
                prop_assert_eq!(allocate("prod", host, cidr, &taken), Some(address));
                // With nothing taken the host gets the first usable address at or after its
                // offset (a reference walk written out plainly).
                let size = cidr.size();
                let mut index = start_offset("prod", host, size);
                while index <= 1 || index == size - 1 {
                    index = (index + 1) % size;
                }
                prop_assert_eq!(
                    allocate("prod", host, cidr, &HashSet::new()),
                    Some(Ipv4Addr::from(u32::from(cidr.network()) + index))
                );
                taken.insert(address);
            }
        }
    }
}
