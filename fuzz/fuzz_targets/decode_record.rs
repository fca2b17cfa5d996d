//! Frames of kind `TR`: decoding never panics, on raw bytes and on payloads wrapped in a frame
//! with a correct checksum (so the bincode payload decoder itself is reached); whatever decodes
//! round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenwal_core::codec::{decode_record, encode_record};

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut f = b"TR".to_vec();
    f.push(1);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn check(bytes: &[u8]) {
    if let Ok(v) = decode_record(bytes) {
        let again = encode_record(&v).expect("a decoded value encodes");
        assert_eq!(decode_record(&again).expect("round trip"), v);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&framed(data));
});
