//! The NDJSON lines of `POST /execute`, as the E2B code-interpreter SDK parses them
//! (`models._parse_output`), and their mapping from Jupyter iopub messages.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::wire::Message;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Stdout {
        text: String,
        timestamp: String,
    },
    Stderr {
        text: String,
        timestamp: String,
    },
    Result(Box<ResultLine>),
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    NumberOfExecutions {
        execution_count: i64,
    },
    EndOfExecution,
    UnexpectedEndOfExecution,
}

impl Line {
    /// The line as sent: compact JSON and `\n`. NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR,
    /// which JSON lets stand raw in a string, are escaped: the Python SDK reads lines with httpx,
    /// which splits on them too (str.splitlines), and then fails to parse both halves. (Upstream's
    /// server sends ASCII-only JSON.) Random bytes in a cell's output hit this now and then.
    pub fn to_bytes(&self) -> bytes::Bytes {
        let v = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(v.len() + 1);
        let mut i = 0;
        while i < v.len() {
            match (v[i], v.get(i + 1), v.get(i + 2)) {
                (0xC2, Some(0x85), _) => {
                    out.extend_from_slice(b"\\u0085");
                    i += 2;
                }
                (0xE2, Some(0x80), Some(c @ (0xA8 | 0xA9))) => {
                    out.extend_from_slice(if *c == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out.push(b'\n');
        out.into()
    }

    pub fn error(name: &str, value: impl Into<String>) -> Line {
        let value = value.into();
        Line::Error {
            name: name.into(),
            traceback: format!("{name}: {value}"),
            value,
        }
    }
}

/// A display or execute result: every MIME representation the kernel gave, under the SDK's names.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ResultLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub javascript: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    pub is_main_result: bool,
}

/// Jupyter sends text MIME bundles either as a string or as a list of lines.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect(),
        other => other.to_string(),
    }
}

/// `'abc'` → `abc`, as the upstream server does for the repr of a str.
fn strip_quotes(s: String) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        s[1..s.len() - 1].to_string()
    } else {
        s
    }
}

impl ResultLine {
    pub fn from_bundle(data: &Map<String, Value>, is_main_result: bool) -> ResultLine {
        let mut r = ResultLine {
            is_main_result,
            ..Default::default()
        };
        for (mime, v) in data {
            match mime.as_str() {
                "text/plain" => r.text = Some(strip_quotes(text_of(v))),
                "text/html" => r.html = Some(text_of(v)),
                "text/markdown" => r.markdown = Some(text_of(v)),
                "image/svg+xml" => r.svg = Some(text_of(v)),
                "image/png" => r.png = Some(text_of(v).replace('\n', "")),
                "image/jpeg" => r.jpeg = Some(text_of(v).replace('\n', "")),
                "application/pdf" => r.pdf = Some(text_of(v).replace('\n', "")),
                "text/latex" => r.latex = Some(text_of(v)),
                "application/json" => r.json = Some(v.clone()),
                "application/javascript" => r.javascript = Some(text_of(v)),
                "e2b/data" => r.data = Some(v.clone()),
                "e2b/chart" => r.chart = Some(v.clone()),
                _ => {
                    r.extra.insert(mime.clone(), v.clone());
                }
            }
        }
        r
    }
}

/// What an iopub message means for the execution it belongs to.
#[derive(Debug, PartialEq)]
pub enum Event {
    Output(Line),
    /// `status: idle`: the kernel finished the request.
    Idle,
    Ignore,
}

pub fn map_iopub(msg: &Message) -> Event {
    let c = &msg.content;
    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default();
    match msg.msg_type() {
        "status" if s("execution_state") == "idle" => Event::Idle,
        "stream" => {
            let text = s("text").to_string();
            let timestamp = msg.header.date.clone();
            Event::Output(if s("name") == "stderr" {
                Line::Stderr { text, timestamp }
            } else {
                Line::Stdout { text, timestamp }
            })
        }
        t @ ("execute_result" | "display_data") => {
            let empty = Map::new();
            let data = c.get("data").and_then(Value::as_object).unwrap_or(&empty);
            Event::Output(Line::Result(Box::new(ResultLine::from_bundle(
                data,
                t == "execute_result",
            ))))
        }
        "error" => {
            let traceback = c
                .get("traceback")
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            Event::Output(Line::Error {
                name: s("ename").into(),
                value: s("evalue").into(),
                traceback,
            })
        }
        "execute_input" => match c.get("execution_count").and_then(Value::as_i64) {
            Some(n) => Event::Output(Line::NumberOfExecutions { execution_count: n }),
            None => Event::Ignore,
        },
        _ => Event::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Session;
    use serde_json::json;

    fn msg(t: &str, content: Value) -> Message {
        Session::new("k").request(t, content)
    }

    fn line(t: &str, content: Value) -> Value {
        match map_iopub(&msg(t, content)) {
            Event::Output(l) => serde_json::from_slice(&l.to_bytes()).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn streams_and_counts() {
        let v = line("stream", json!({"name": "stdout", "text": "hi\n"}));
        assert_eq!(v["type"], "stdout");
        assert_eq!(v["text"], "hi\n");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            line("stream", json!({"name": "stderr", "text": "e"}))["type"],
            "stderr"
        );
        assert_eq!(
            line("execute_input", json!({"code": "", "execution_count": 3})),
            json!({"type": "number_of_executions", "execution_count": 3})
        );
        assert_eq!(
            map_iopub(&msg("status", json!({"execution_state": "idle"}))),
            Event::Idle
        );
        assert_eq!(
            map_iopub(&msg("status", json!({"execution_state": "busy"}))),
            Event::Ignore
        );
        assert_eq!(
            Line::EndOfExecution.to_bytes(),
            &b"{\"type\":\"end_of_execution\"}\n"[..]
        );
    }

    #[test]
    fn results_map_every_mime() {
        let v = line(
            "execute_result",
            json!({"execution_count": 1, "metadata": {}, "data": {
                "text/plain": "'hello'", "text/html": ["<b>", "x</b>"], "image/png": "iVBO\nRw==",
                "application/json": {"a": 1}, "e2b/chart": {"type": "line"},
                "application/vnd.custom": "z", "text/latex": "$x$"
            }}),
        );
        assert_eq!(v["type"], "result");
        assert_eq!(v["text"], "hello");
        assert_eq!(v["html"], "<b>x</b>");
        assert_eq!(v["png"], "iVBORw==");
        assert_eq!(v["json"], json!({"a": 1}));
        assert_eq!(v["chart"], json!({"type": "line"}));
        assert_eq!(v["latex"], "$x$");
        assert_eq!(v["extra"], json!({"application/vnd.custom": "z"}));
        assert_eq!(v["is_main_result"], true);
        let d = line("display_data", json!({"data": {"text/plain": "2"}}));
        assert_eq!(
            d,
            json!({"type": "result", "text": "2", "is_main_result": false})
        );
    }

    #[test]
    fn line_breaks_other_than_newline_are_escaped() {
        let l = Line::Stdout {
            text: "a\u{85}b\u{2028}c\u{2029}d\u{1c}é\n".into(),
            timestamp: String::new(),
        };
        let b = l.to_bytes();
        let text = std::str::from_utf8(&b).unwrap();
        assert_eq!(
            text,
            "{\"type\":\"stdout\",\"text\":\"a\\u0085b\\u2028c\\u2029d\\u001cé\\n\",\"timestamp\":\"\"}\n"
        );
        // What Python's str.splitlines (httpx's line reader) sees: one line, the same text.
        assert_eq!(
            text.matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
                .count(),
            1
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["text"], "a\u{85}b\u{2028}c\u{2029}d\u{1c}é\n");
    }

    #[test]
    fn errors() {
        let v = line(
            "error",
            json!({"ename": "NameError", "evalue": "name 'x' is not defined",
                   "traceback": ["line 1", "NameError: name 'x' is not defined"]}),
        );
        assert_eq!(
            v,
            json!({"type": "error", "name": "NameError", "value": "name 'x' is not defined",
                   "traceback": "line 1\nNameError: name 'x' is not defined"})
        );
        assert_eq!(strip_quotes("\"".into()), "\"");
        assert_eq!(strip_quotes("'a\"".into()), "'a\"");
    }
}
