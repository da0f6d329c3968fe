//! `warren audit`: the daemon's audit log, as a table, JSON or JSON lines.

use crate::client::ApiClient;
use crate::output;
use crate::Output;
use clap::Args;
use http::Method;
use serde_json::Value;

#[derive(Args)]
pub struct AuditArgs {
    /// Only entries about this sandbox.
    #[arg(long)]
    sandbox: Option<String>,
    /// Only entries made with this API key id.
    #[arg(long)]
    key: Option<String>,
    /// Only entries of this kind: api, process, file, network or lifecycle.
    #[arg(long)]
    kind: Option<String>,
    /// Only entries at or after this time (RFC 3339, e.g. 2026-12-05T10:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only entries before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// At most this many entries (oldest first).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Print JSON lines (one entry per line), for export.
    #[arg(long)]
    jsonl: bool,
}

pub async fn run(api: &ApiClient, out: Output, a: AuditArgs) -> anyhow::Result<()> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("sandbox", &a.sandbox),
        ("key", &a.key),
        ("kind", &a.kind),
        ("since", &a.since),
        ("until", &a.until),
    ] {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    query.append_pair("limit", &a.limit.to_string());
    let (_, _, body) = api
        .call(
            Method::GET,
            &format!("/warren/v1/audit?{}", query.finish()),
            None,
        )
        .await?;
    let entries = body.as_array().cloned().unwrap_or_default();
    if a.jsonl {
        for e in &entries {
            println!("{e}");
        }
        return Ok(());
    }
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let cell = |e: &Value, k: &str| match &e[k] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let detail = match &e["detail"] {
                Value::Null => String::new(),
                d => d.to_string(),
            };
            vec![
                cell(e, "seq"),
                cell(e, "ts"),
                cell(e, "kind"),
                cell(e, "key_id"),
                cell(e, "sandbox"),
                cell(e, "action"),
                cell(e, "result"),
                detail,
            ]
        })
        .collect();
    output::table(
        &[
            "SEQ", "TIME", "KIND", "KEY", "SANDBOX", "ACTION", "RESULT", "DETAIL",
        ],
        &rows,
    );
    Ok(())
}
