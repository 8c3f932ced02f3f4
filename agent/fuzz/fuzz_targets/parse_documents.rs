//! The object parser on arbitrary bytes: it must not panic, and each object comes out once.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use static_egress::source::documents::parse_documents;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(documents) = parse_documents(text) {
        let mut keys = HashSet::new();
        for object in &documents.objects {
            assert!(keys.insert(object.key()), "{} returned twice", object.key());
        }
    }
});
