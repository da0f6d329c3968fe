//! `warren apply -f`, `warren delete -f` and `warren pool list`: declarative pool objects.
//!
//! The YAML is parsed here (serde-saphyr, several documents separated by `---`) only far enough
//! to route each document by `kind` and `metadata.name`; the daemon validates the object itself,
//! so the CLI and the REST API report the same errors.

use crate::client::ApiClient;
use crate::output;
use crate::Output;
use anyhow::{anyhow, bail, Context};
use http::Method;
use serde_json::Value;
use std::path::Path;

/// The collection path of each kind.
fn collection(kind: &str) -> Option<&'static str> {
    match kind {
        "SandboxSet" => Some("sandboxsets"),
        "PoolingAutoScaler" => Some("poolingautoscalers"),
        "Commit" => Some("commits"),
        "Checkpoint" => Some("checkpoints"),
        _ => None,
    }
}

/// Every document of a YAML file (`-` is standard input), with its kind's collection and name.
pub fn read_objects(file: &Path) -> anyhow::Result<Vec<(&'static str, String, Value)>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| anyhow!("{}: invalid YAML: {e}", file.display()))?;
    let mut out = vec![];
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let n = i + 1;
        let kind = doc["kind"].as_str().unwrap_or_default();
        let coll = collection(kind).ok_or_else(|| {
            anyhow!(
                "{} document {n}: unknown kind {kind:?} (expected SandboxSet, PoolingAutoScaler, Commit or Checkpoint)",
                file.display()
            )
        })?;
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| anyhow!("{} document {n}: metadata.name is required", file.display()))?
            .to_string();
        out.push((coll, name, doc));
    }
    if out.is_empty() {
        bail!("{}: no objects found", file.display());
    }
    Ok(out)
}

fn singular(coll: &str) -> &str {
    coll.trim_end_matches('s')
}

pub async fn apply(api: &ApiClient, file: &Path) -> anyhow::Result<u8> {
    let mut failed = 0;
    for (coll, name, doc) in read_objects(file)? {
        let path = format!("/warren/v1/{coll}/{name}");
        match api.call(Method::PUT, &path, Some(doc)).await {
            Ok(_) => println!("{}/{name} applied", singular(coll)),
            Err(e) => {
                eprintln!("warren: {}/{name}: {e:#}", singular(coll));
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub async fn delete(api: &ApiClient, file: &Path) -> anyhow::Result<u8> {
    let mut failed = 0;
    for (coll, name, _) in read_objects(file)? {
        let path = format!("/warren/v1/{coll}/{name}");
        match api.call(Method::DELETE, &path, None).await {
            Ok(_) => println!("{}/{name} deleted", singular(coll)),
            Err(e) => {
                eprintln!("warren: {}/{name}: {e:#}", singular(coll));
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub async fn list(api: &ApiClient, out: Output) -> anyhow::Result<()> {
    let (_, _, v) = api.call(Method::GET, "/warren/v1/pools", None).await?;
    if out == Output::Json {
        output::json(&v);
        return Ok(());
    }
    let num = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0).to_string();
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            vec![
                output::str_field(p, "name"),
                output::str_field(p, "template"),
                num(p, "replicas"),
                num(p, "availableReplicas"),
                num(p, "startingReplicas"),
                num(p, "claimedReplicas"),
                num(p, "staleReplicas"),
                output::str_field(p, "autoscaler"),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "TEMPLATE",
            "DESIRED",
            "READY",
            "STARTING",
            "CLAIMED",
            "UPDATING",
            "AUTOSCALER",
        ],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_talks_yaml_and_refuses_unknown_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pool.yaml");
        std::fs::write(
            &f,
            r#"apiVersion: agents.kruise.io/v1alpha1
kind: SandboxSet
metadata:
  name: code-interpreter
spec:
  replicas: 10
  template: base
---
apiVersion: agents.kruise.io/v1alpha1
kind: PoolingAutoScaler
metadata:
  name: code-autoscaler
spec:
  scaleTargetRef:
    apiVersion: agents.kruise.io/v1alpha1
    kind: sandboxset
    name: code-interpreter
  observeWindowSeconds: 600
  minReplicas: 3
  maxReplicas: 100
  minAvailableRatio: 20%
  maxAvailableRatio: 90%
  schedule:
    - startTime: "2025-12-1 00:00:00"
      endTime: "2031-12-12 00:00:00"
      bounds:
        - cron: "* 0-8 ? * MON-FRI"
          minReplicas: 10
          maxReplicas: 150
"#,
        )
        .unwrap();
        let objs = read_objects(&f).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(
            (objs[0].0, objs[0].1.as_str()),
            ("sandboxsets", "code-interpreter")
        );
        assert_eq!(objs[0].2["spec"]["replicas"], 10);
        assert_eq!(objs[1].0, "poolingautoscalers");
        assert_eq!(objs[1].2["spec"]["minAvailableRatio"], "20%");
        // The daemon's types accept the talk's object unchanged.
        let scaler: warren_core::objects::PoolingAutoScaler =
            serde_json::from_value(objs[1].2.clone()).unwrap();
        scaler.compile().unwrap();

        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Deployment\nmetadata:\n  name: x\n",
        )
        .unwrap();
        let err = read_objects(&f).unwrap_err().to_string();
        assert!(err.contains("unknown kind \"Deployment\""), "{err}");
        std::fs::write(&f, "kind: SandboxSet\nmetadata: [\n").unwrap();
        assert!(read_objects(&f)
            .unwrap_err()
            .to_string()
            .contains("invalid YAML"));
    }
}
