//! logic's JSON token auth (goim's development `AuthToken`).
#![no_main]

use goim_logic::auth::{Authenticator, JsonTokenAuth, MAX_ID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(id) = JsonTokenAuth.authenticate(data, "") else {
        return;
    };
    assert!(id.key.len() <= MAX_ID);
    assert!(id.room_id.len() <= MAX_ID);
    assert_eq!(
        data.iter().find(|b| !b.is_ascii_whitespace()),
        Some(&b'{'),
        "only a JSON object is a token"
    );
    // The identity written back as a token authenticates to itself.
    let again = serde_json::json!({
        "mid": id.mid,
        "key": id.key,
        "room_id": id.room_id,
        "platform": "web",
        "accepts": id.accepts,
    })
    .to_string();
    assert_eq!(JsonTokenAuth.authenticate(again.as_bytes(), ""), Ok(id));
});
