//! The comet's WebSocket upgrade request parser.
#![no_main]

use bytes::BytesMut;
use goim_comet::ws::{parse_upgrade, upgrade_response, MAX_REQUEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    match parse_upgrade(&mut buf) {
        Ok(Some(up)) => {
            // Exactly the request head up to its blank line was consumed.
            let used = data.len() - buf.len();
            assert!(data[..used].ends_with(b"\r\n\r\n"));
            assert!(!data[..used - 1].windows(4).any(|w| w == b"\r\n\r\n"));
            assert_eq!(&data[used..], &buf[..]);
            assert!(!up.key.is_empty());
            for v in [&up.key, &up.cookie] {
                assert!(!v.contains("\r\n"));
                assert_eq!(v.trim(), v);
            }
            // The reply is one well-formed head whatever the key held.
            let resp = upgrade_response(&up.key);
            assert!(resp.starts_with("HTTP/1.1 101 "));
            assert_eq!(resp.matches("\r\n\r\n").count(), 1);
            assert!(resp.ends_with("\r\n\r\n"));
        }
        Ok(None) => {
            // Incomplete: nothing consumed, and never more than the limit held.
            assert_eq!(&buf[..], data);
            assert!(data.len() < MAX_REQUEST);
        }
        Err(_) => {}
    }
});
