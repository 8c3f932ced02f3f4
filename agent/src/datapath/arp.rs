//! Gratuitous ARP, so that neighbours (the router above all) learn at once which MAC now
//! answers for an egress IP that moved to this node, repeated a few times.

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::sync::watch;

const ETH_P_ARP: u16 = 0x0806;

fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet / IPv4, 6-byte hardware and 4-byte protocol addresses, request.
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// After the first announcement, the waits before each repeat: a neighbour that missed one
/// (a busy switch, a router that rate-limits ARP) learns the move within a few seconds anyway.
const REPEATS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(800),
    Duration::from_secs(2),
];

/// Repeats the announcement of `ip` while `held` says this node still holds it: one made after
/// the address moved on would send its traffic back here.
pub async fn repeat(
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
) {
    for wait in REPEATS {
        tokio::time::sleep(wait).await;
        if !held.borrow().contains(&ip) {
            return;
        }
        if let Err(error) = announce(ifindex, mac, ip) {
            tracing::debug!(%ip, %error, "repeating a gratuitous ARP");
            return;
        }
    }
}

pub fn announce(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the descriptor is closed below on every path.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let f = frame(mac, ip);
    // SAFETY: `f` and `addr` outlive the call and their sizes are passed along.
    let sent = unsafe {
        libc::sendto(
            fd,
            f.as_ptr().cast(),
            f.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let result = if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: `fd` is ours and not used afterwards.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_request_names_the_address_twice() {
        let f = frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 99, 0, 200));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 99, 0, 200]);
        assert_eq!(&f[38..42], &[10, 99, 0, 200]);
    }
}
