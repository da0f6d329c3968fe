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
    doc
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
        let mut s = document()
            .to_pretty_json()
            .expect("an OpenAPI document serializes");
        s.push('\n');
        s
    })
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
