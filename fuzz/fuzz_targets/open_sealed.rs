//! Sealed envelopes (`tokenwal-store/2`, the encryption at rest around every grant state): opening
//! never panics, on raw bytes and on a valid envelope altered by the input (bytes XORed in, cut
//! short, extended, CRC fixed up or not); an altered envelope never opens; whatever opens decodes
//! as a state frame or fails cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tokenwal_core::codec::decode_state;
use tokenwal_core::GrantKey;
use tokenwal_store::{open_state_frame, seal_state_frame, KeyRing, StoreError};

struct Fixture {
    ring: KeyRing,
    grant: GrantKey,
    sealed: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ring = KeyRing::insecure_test_ring();
        let grant = GrantKey::new("shopify", "fuzz.myshopify.com").expect("valid grant key");
        let sealed = seal_state_frame(&ring, &grant, 5, b"a state frame, opaque to the envelope");
        Fixture { ring, grant, sealed }
    })
}

fn open(bytes: &[u8]) -> Result<(), StoreError> {
    let f = fixture();
    let plain = open_state_frame(&f.ring, &f.grant, bytes)?;
    let _ = decode_state(&plain);
    Ok(())
}

fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let end = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..end]).to_le_bytes();
        bytes[end..].copy_from_slice(&crc);
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = open(data);
    let Some((&mode, rest)) = data.split_first() else { return };
    let f = fixture();
    let mut bad = f.sealed.clone();
    match mode % 3 {
        0 => bad.iter_mut().zip(rest).for_each(|(b, x)| *b ^= x),
        1 => bad.truncate(usize::from(rest.first().copied().unwrap_or(0)) % f.sealed.len()),
        _ => bad.extend_from_slice(rest),
    }
    if mode & 0x80 != 0 {
        fix_crc(&mut bad);
    }
    if bad != f.sealed {
        assert!(open(&bad).is_err(), "an altered envelope opened");
    }
});
