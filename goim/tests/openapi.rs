//! `docs/openapi.json` describes logic's HTTP API as it is served: every route logic's router
//! declares is documented and nothing else is, and every documented operation, called on a
//! running standalone server over a socket, answers with a documented status and fields.

mod common;

use std::collections::BTreeSet;

use serde_json::Value;

const SPEC: &str = include_str!("../../docs/openapi.json");
const ROUTER: &str = include_str!("../../logic/src/http.rs");
const CHAT_ROUTER: &str = include_str!("../../logic/src/chat/http.rs");

/// A value for a parameter the spec names, as a client would send it (None: left out).
fn sample(name: &str) -> Option<&'static str> {
    Some(match name {
        // History takes `before` or `after`, not both: `after` is sampled.
        "before" => return None,
        "after" => "0",
        "id" => "openapi",
        "keys" => "k1",
        "mids" | "room" | "rooms" => "1",
        "type" => "live",
        "limit" => "5",
        "operation" => "1000",
        "speed" => "0",
        "platform" => "web",
        "reason" => "maintenance",
        "mid" => "1",
        other => panic!("no sample value for parameter {other:?}: add one"),
    })
}

/// The fields an object schema documents, through `allOf` and `$ref`s into `spec`.
fn documented_fields(spec: &Value, schema: &Value, out: &mut BTreeSet<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unsupported $ref {r}"));
        return documented_fields(spec, &spec["components"]["schemas"][name], out);
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            documented_fields(spec, s, out);
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        out.extend(props.keys().cloned());
    }
}

/// The schema of `data` in an envelope response, if it documents one.
fn data_schema(response: &Value) -> Option<&Value> {
    response["content"]["application/json"]["schema"]["allOf"]
        .as_array()?
        .iter()
        .find_map(|s| s["properties"].get("data"))
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let spec: Value = serde_json::from_str(SPEC).expect("docs/openapi.json parses");
    let documented: BTreeSet<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();
    let served: BTreeSet<String> = [ROUTER, CHAT_ROUTER]
        .iter()
        .flat_map(|r| r.split(".route(").skip(1))
        .filter_map(|s| s.split('"').nth(1))
        .map(String::from)
        .collect();
    assert!(!served.is_empty());
    assert_eq!(
        documented, served,
        "docs/openapi.json and logic's routes differ"
    );
}

#[tokio::test]
async fn every_documented_operation_answers_as_described() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config();
    cfg.logic.conversations.store = format!("sqlite://{}", dir.path().join("chat.db").display());
    let server = common::start_with(cfg).await;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let mut target = path.clone();
            let mut query = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                let Some(v) = sample(name) else { continue };
                if p["in"] == "path" {
                    target = target.replace(&format!("{{{name}}}"), v);
                } else {
                    query.push(format!("{name}={v}"));
                }
            }
            if !query.is_empty() {
                target = format!("{target}?{}", query.join("&"));
            }
            // A JSON route gets its documented example; goim's take any bytes.
            let body = match op["requestBody"]["content"]["application/json"].get("example") {
                Some(e) => e.to_string().into_bytes(),
                None => b"openapi".to_vec(),
            };
            if path.starts_with("/goim/conversations/") {
                // Each call finds the conversation it names with its members, whatever the
                // calls before did to it.
                let setup = br#"{"id":"openapi","members":[1,2]}"#;
                common::http(server.http, "POST", "/goim/conversations", setup).await;
                let add = br#"{"mids":[1,2]}"#;
                let members = "/goim/conversations/openapi/members";
                common::http(server.http, "POST", members, add).await;
            }
            let (status, body) = common::within(common::http(
                server.http,
                &method.to_uppercase(),
                &target,
                &body,
            ))
            .await;
            let response = &op["responses"][status.to_string()];
            assert!(
                response.is_object(),
                "{method} {target}: status {status} is not documented"
            );
            let Some(json) = response["content"].get("application/json") else {
                continue;
            };
            let reply: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{method} {target}: {e}: {body}"));
            let mut fields = BTreeSet::new();
            documented_fields(&spec, &json["schema"], &mut fields);
            for key in reply.as_object().unwrap().keys() {
                assert!(
                    fields.contains(key) || key == "data",
                    "{method} {target}: {key:?} is not documented"
                );
            }
            assert_eq!(reply["code"], 0, "{method} {target}: {body}");
            // What `data` holds is documented, field by field, where the spec lists fields.
            if let Some(schema) = data_schema(response) {
                let item = if schema["type"] == "array" {
                    &schema["items"]
                } else {
                    schema
                };
                let mut known = BTreeSet::new();
                documented_fields(&spec, item, &mut known);
                let objects: Vec<&Value> = match &reply["data"] {
                    Value::Array(a) => a.iter().collect(),
                    v => vec![v],
                };
                for o in objects.iter().filter_map(|o| o.as_object()) {
                    if known.is_empty() {
                        continue;
                    }
                    for key in o.keys() {
                        assert!(
                            known.contains(key),
                            "{method} {target}: data.{key} is not documented"
                        );
                    }
                }
            }
        }
    }
    server.shutdown().await;
}
