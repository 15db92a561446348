//! The demo page standalone serves at `/`: the TypeScript client's compiled modules
//! (`clients/js/dist`, committed and checked fresh by CI) and a page that uses them.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

const PAGE: &str = include_str!("../../clients/js/demo/index.html");
const MODULES: [(&str, &str); 4] = [
    ("demo.js", include_str!("../../clients/js/dist/demo.js")),
    ("client.js", include_str!("../../clients/js/dist/client.js")),
    ("packet.js", include_str!("../../clients/js/dist/packet.js")),
    ("index.js", include_str!("../../clients/js/dist/index.js")),
];

/// `/`, `/demo/*.js` and `/demo/config.json` (which tells the page the WebSocket port).
pub fn router(ws_port: u16) -> Router {
    let mut r = Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }),
        )
        .route(
            "/demo/config.json",
            get(move || async move { Json(serde_json::json!({ "ws_port": ws_port })) }),
        );
    for (name, text) in MODULES {
        r = r.route(
            &format!("/demo/{name}"),
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    text,
                )
                    .into_response()
            }),
        );
    }
    r
}
