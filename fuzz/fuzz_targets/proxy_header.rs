//! The comet's PROXY protocol header parser (v1 and v2), as a load balancer's bytes reach it.
#![no_main]

use goim_comet::proxy::{parse, Header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Some(Header { len, .. })) => {
            // A header is within the input and within the protocol's bounds.
            assert!(len <= data.len());
            assert!(len <= 16 + 512);
            // What follows the header is untouched: parsing a prefix that ends at the
            // header gives the same header.
            assert_eq!(parse(&data[..len]).unwrap().unwrap().len, len);
        }
        Ok(None) => {
            // Incomplete only while short of either version's longest header.
            assert!(data.len() < 16 + 512);
        }
        Err(_) => {}
    }
});
