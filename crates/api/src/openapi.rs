//! The OpenAPI document of the REST API, generated from the handlers' `#[utoipa::path]`
//! annotations as [`crate::app`] registers them (so a route cannot be served undocumented by
//! accident), served at `GET /openapi.json` and checked in as `docs/openapi.json`.
//!
//! To document a new route: annotate its handler with `#[utoipa::path(METHOD, path = "...",
//! tag = "...", params(...), request_body = T, responses((status = N, body = T)))]`, derive
//! `utoipa::ToSchema` on the request and answer types, register it with
//! `.routes(utoipa_axum::routes!(handler))` on an `OpenApiRouter` instead of `.route(..)`, and
//! regenerate the file with `WARREN_UPDATE_OPENAPI=1 cargo test -p warren-api openapi`.
//! Error answers (`default`) and the security schemes are added here to every operation.

use crate::error::ErrorJson;
use axum::http::header;
use axum::response::IntoResponse;
use std::sync::OnceLock;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Doc, RefOr, ResponseBuilder};
use utoipa::{OpenApi, ToSchema};

pub const API_KEY_SCHEME: &str = "ApiKeyAuth";
pub const BEARER_SCHEME: &str = "AccessTokenAuth";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Warren",
        description = "Warren's REST API: the E2B control-plane endpoints (`/sandboxes`, \
            `/v2/sandboxes`) that the E2B SDKs call, and Warren's own (`/warren/v1`). Every \
            error answer is `{\"code\": <HTTP status>, \"message\": \"...\"}`. Requests to a \
            sandbox's envd and ports (by the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers or \
            the Host name) are routed to the sandbox and are not part of this document.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorJson)),
    security(("ApiKeyAuth" = []), ("AccessTokenAuth" = [])),
    tags(
        (name = "sandboxes", description = "Sandbox lifecycle (E2B)"),
        (name = "templates", description = "Templates from OCI images or directories"),
        (name = "pools", description = "Warm pools: SandboxSet and PoolingAutoScaler"),
        (name = "commits", description = "Commits of a sandbox to an image, and registry secrets"),
        (name = "checkpoints", description = "Checkpoints (E2B snapshots), restores and forks"),
        (name = "audit", description = "The audit log"),
        (name = "meta", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Adds what every operation shares: the E2B error shape as the `default` answer, and the two
/// ways to present a key.
pub(crate) fn finish(mut doc: Doc) -> Doc {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        API_KEY_SCHEME,
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-API-Key",
            "A Warren API key (`warren_...`), as the E2B SDKs send it",
        ))),
    );
    components.add_security_scheme(
        BEARER_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("The same API key as `Authorization: Bearer <key>`"))
                .build(),
        ),
    );
    let error = ResponseBuilder::new()
        .description("An error, in the E2B shape")
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorJson::name(),
                ))))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("default".into())
                .or_insert_with(|| RefOr::T(error.clone()));
        }
    }
    add_links(&mut doc);
    doc
}

/// Links from the answers that name a new object to the operations on it, so clients (and
/// schemathesis' stateful phase) know that `sandboxID` of a create is the `{id}` of the rest.
fn add_links(doc: &mut Doc) {
    // (method, path, status, runtime expression of the name, target path pattern)
    const SOURCES: &[(&str, &str, &str, &str, &str)] = &[
        (
            "post",
            "/v2/sandboxes",
            "201",
            "$response.body#/sandboxID",
            "sandboxes/{id}",
        ),
        (
            "post",
            "/sandboxes",
            "201",
            "$response.body#/sandboxID",
            "sandboxes/{id}",
        ),
        (
            "post",
            "/warren/v1/templates",
            "202",
            "$response.body#/name",
            "/warren/v1/templates/{name}",
        ),
        (
            "post",
            "/warren/v1/commits",
            "202",
            "$response.body#/metadata/name",
            "/warren/v1/commits/{name}",
        ),
        (
            "put",
            "/warren/v1/commits/{name}",
            "202",
            "$request.path.name",
            "/warren/v1/commits/{name}",
        ),
        (
            "post",
            "/warren/v1/checkpoints",
            "201",
            "$response.body#/metadata/name",
            "/warren/v1/checkpoints/{name}",
        ),
        (
            "put",
            "/warren/v1/checkpoints/{name}",
            "201",
            "$request.path.name",
            "/warren/v1/checkpoints/{name}",
        ),
        (
            "put",
            "/warren/v1/secrets/{name}",
            "200",
            "$request.path.name",
            "/warren/v1/secrets/{name}",
        ),
        (
            "put",
            "/warren/v1/sandboxsets/{name}",
            "200",
            "$request.path.name",
            "/warren/v1/sandboxsets/{name}",
        ),
        (
            "put",
            "/warren/v1/poolingautoscalers/{name}",
            "200",
            "$request.path.name",
            "/warren/v1/poolingautoscalers/{name}",
        ),
    ];
    let ops: Vec<(String, String, String)> = doc
        .paths
        .paths
        .iter()
        .flat_map(|(path, item)| {
            [
                ("get", &item.get),
                ("put", &item.put),
                ("post", &item.post),
                ("delete", &item.delete),
            ]
            .into_iter()
            .filter_map(|(m, op)| {
                let id = op.as_ref()?.operation_id.clone()?;
                Some((path.clone(), m.to_string(), id))
            })
        })
        .collect();
    for (method, path, status, expr, target) in SOURCES {
        let param = if target.ends_with("{name}") {
            "name"
        } else {
            "id"
        };
        let Some(item) = doc.paths.paths.get_mut(*path) else {
            continue;
        };
        let op = match *method {
            "post" => item.post.as_mut(),
            _ => item.put.as_mut(),
        };
        let Some(RefOr::T(resp)) = op.and_then(|o| o.responses.responses.get_mut(*status)) else {
            continue;
        };
        for (tpath, tmethod, tid) in &ops {
            let hit = if target.starts_with('/') {
                tpath == target
            } else {
                tpath.contains(target)
            };
            if hit && !(tpath == path && tmethod == method) {
                resp.links.insert(
                    tid.clone(),
                    RefOr::T(
                        utoipa::openapi::link::LinkBuilder::new()
                            .operation_id(tid.clone())
                            .parameter(param, *expr)
                            .build(),
                    ),
                );
            }
        }
    }
}

/// The document, built once from the same routes [`crate::app`] serves.
pub fn document() -> &'static Doc {
    static DOC: OnceLock<Doc> = OnceLock::new();
    DOC.get_or_init(|| finish(crate::documented_routes().split_for_parts().1))
}

/// The document as `GET /openapi.json` serves it and `docs/openapi.json` holds it.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut v = serde_json::to_value(document()).expect("an OpenAPI document serializes");
        camel_case_links(&mut v);
        let mut s = serde_json::to_string_pretty(&Sorted(&v)).expect("a JSON value serializes");
        s.push('\n');
        s
    })
}

/// A JSON value written with its object keys sorted: whether serde_json keeps insertion order
/// depends on which crates a build unifies features for (`preserve_order`), and the checked-in
/// copy must not change with that.
struct Sorted<'a>(&'a serde_json::Value);

impl serde::Serialize for Sorted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, &Sorted(v))?;
                }
                map.end()
            }
            serde_json::Value::Array(a) => s.collect_seq(a.iter().map(Sorted)),
            other => other.serialize(s),
        }
    }
}

/// utoipa 5 writes a Link's `operationId` as `operation_id` (fixed in utoipa 6, which needs a
/// newer Rust than the workspace's rust-version); clients would not see the links otherwise.
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let links = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|resp| resp.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        if let Some(id) = link.remove("operation_id") {
            link.insert("operationId".into(), id);
        }
    }
}

/// This document; needs no key.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn checked_in() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
    }

    /// CI catches a checked-in document that no longer matches the code; regenerate with
    /// `WARREN_UPDATE_OPENAPI=1 cargo test -p warren-api openapi`.
    #[test]
    fn checked_in_openapi_matches_the_code() {
        let fresh = document_json();
        if std::env::var_os("WARREN_UPDATE_OPENAPI").is_some() {
            std::fs::write(checked_in(), fresh).unwrap();
        }
        let on_disk = std::fs::read_to_string(checked_in()).unwrap_or_default();
        assert!(
            on_disk == fresh,
            "docs/openapi.json is stale; run `WARREN_UPDATE_OPENAPI=1 cargo test -p warren-api openapi`"
        );
    }

    /// Clients generated from the document name methods by operationId: two handlers with the
    /// same function name in different modules must be told apart with `operation_id = ".."`.
    #[test]
    fn openapi_operation_ids_are_unique_and_errors_are_e2b_shaped() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap();
                assert!(
                    seen.insert(id.to_string()),
                    "{method} {path}: operationId {id} twice"
                );
                assert_eq!(
                    op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {path}"
                );
            }
        }
        assert!(seen.len() >= 40, "only {} operations", seen.len());
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["ApiKeyAuth"]["name"], "X-API-Key");
        assert_eq!(schemes["AccessTokenAuth"]["scheme"], "bearer");
    }
}
