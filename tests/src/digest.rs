//! The digest the agent reports in `status.json` as `applied_digest`.

/// FNV-1a 64-bit of `bytes` as 16 lowercase hex digits.
///
/// The agent hashes the objects file it applied the same way, so a test knows the agent caught
/// up with a given version of the file by comparing the two strings.
pub fn digest(bytes: &[u8]) -> String {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::digest;

    #[test]
    fn matches_published_fnv1a_64_vectors() {
        assert_eq!(digest(b""), "cbf29ce484222325");
        assert_eq!(digest(b"a"), "af63dc4c8601ec8c");
        assert_eq!(digest(b"foobar"), "85944171f73967e8");
    }

    #[test]
    fn is_sixteen_lowercase_hex_digits() {
        let d = digest(b"apiVersion: v1\n");
        assert_eq!(d.len(), 16);
        assert!(
            d.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
    }
}
