//! Forgetting the connections translated to an egress IP when this node takes it: any it
//! still tracks were carried by another holder since (the IP moved away and back), so their
//! TCP windows are stale and conntrack would call their next packets invalid, and the
//! connections would stall here. Forgotten, a connection is picked up again from the pod's
//! next packet, translated to the same port (README, "Failover").

use std::net::Ipv4Addr;
use std::process::Command;

/// Deletes the tracked connections whose replies go to `ip`; a message when that failed.
pub fn forget_translated_to(ip: Ipv4Addr) -> Result<(), String> {
    let out = Command::new("conntrack")
        .args(["-D", "--reply-dst", &ip.to_string()])
        .output()
        .map_err(|e| format!("running conntrack: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // conntrack exits with 1 when there was nothing to delete.
    if out.status.success() || stderr.contains(" 0 flow entries") {
        Ok(())
    } else {
        Err(stderr.trim().to_owned())
    }
}
