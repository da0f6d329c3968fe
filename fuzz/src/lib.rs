//! Fuzz harnesses for the parsers that read untrusted bytes: the Connect envelope decoder of
//! envd, the host-name router, the layer unpacker (tar and OCI whiteouts) and the YAML objects
//! of the control plane. Each takes arbitrary bytes, must never panic or hang, and asserts the
//! property that makes its parser safe (what it returns is what was sent; nothing lands outside
//! the layer directory; a routed host name really names that sandbox).

use arbitrary::Unstructured;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use std::io::Cursor;
use std::path::Path;

/// Cuts `data` into chunks of 1..=`max` bytes, sizes drawn from `sizes`, as a body arrives.
fn chunks(data: &[u8], sizes: &[u8], max: usize) -> Vec<Bytes> {
    let mut out = vec![];
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |s| *s as usize % max + 1)
            .min(rest.len());
        out.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
        i += 1;
    }
    out
}

fn read_all(body: Vec<Bytes>) -> (Vec<Bytes>, Option<warren_envd::connect::RpcError>) {
    use warren_envd::connect::EnvelopeReader;
    let mut reader = EnvelopeReader::new(futures::stream::iter(
        body.into_iter().map(Ok::<Bytes, String>),
    ));
    let mut got = vec![];
    loop {
        match futures::executor::block_on(reader.next_message()) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, None),
            Err(e) => return (got, Some(e)),
        }
    }
}

/// envd's request-stream decoder: arbitrary bytes in arbitrary chunks end in messages or a
/// Connect error, and every message decodes to a request or an `invalid_argument`. Then the
/// round trip: payloads enveloped by `connect::envelope` come back as they were, however the
/// stream is cut.
pub fn connect_envelope(data: &[u8]) {
    use warren_envd::connect::{decode, envelope};
    use warren_envd::proto::{StartRequest, StreamInputRequest};
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (got, _) = read_all(chunks(rest, &[cut, cut / 3, cut / 7], 64));
    for m in &got {
        assert!(m.len() <= rest.len());
        let _ = decode::<StartRequest>(m);
        let _ = decode::<StreamInputRequest>(m);
        let _ = decode::<serde_json::Value>(m);
    }

    let payloads: Vec<&[u8]> = rest.split(|b| *b == 0xff).take(16).collect();
    let mut stream = vec![];
    for p in &payloads {
        stream.extend(envelope(0, p));
    }
    let (back, err) = read_all(chunks(&stream, rest, 1 + cut as usize));
    assert!(err.is_none(), "well-formed envelopes refused: {err:?}");
    assert_eq!(back.len(), payloads.len());
    for (a, b) in back.iter().zip(&payloads) {
        assert_eq!(&a[..], *b);
    }
}

/// The router's reading of `Host` (`<port>-<id>.<domain>`) and of the E2B sandbox headers.
/// Input: `domain\nhost` (or just a host under `sbx.test`), or `id\nport\n...` headers. A
/// target it returns always has a real port and an id the host name or header really holds.
pub fn host_router(data: &[u8]) {
    use warren_api::proxy::target_of;
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (a, b) = (parts.next().unwrap_or(b""), parts.next());
    let (domain, host) = match b {
        Some(h) => (String::from_utf8_lossy(a).into_owned(), h),
        None => ("sbx.test".to_string(), a),
    };
    if let Ok(v) = HeaderValue::from_bytes(host) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, v);
        for d in [Some(domain.as_str()), None] {
            if let Ok(Some(t)) = target_of(&headers, d) {
                let host = String::from_utf8_lossy(host).to_ascii_lowercase();
                let domain = domain.to_ascii_lowercase();
                assert_ne!(t.port, 0, "{host}");
                assert!(
                    !t.sandbox_id.is_empty()
                        && t.sandbox_id
                            .bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                    "{host} -> {t:?}"
                );
                assert!(
                    host.contains(&format!("-{}.{domain}", t.sandbox_id)),
                    "{host} under {domain:?} -> {t:?}"
                );
            }
        }
    }
    // The header form: E2b-Sandbox-Id and E2b-Sandbox-Port.
    if let (Ok(id), Ok(port)) = (
        HeaderValue::from_bytes(a),
        HeaderValue::from_bytes(b.unwrap_or(b"")),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("e2b-sandbox-id", id);
        headers.insert("e2b-sandbox-port", port);
        if let Ok(Some(t)) = target_of(&headers, Some("sbx.test")) {
            assert_ne!(t.port, 0);
            assert_eq!(t.sandbox_id.as_bytes(), a);
        }
    }
}

/// Path pieces a layer could use to get out: `..`, absolute paths, whiteouts of them, and (as
/// symlink and hard-link targets) the absolute path of a directory next to the layer's.
const PIECES: &[&str] = &[
    "a",
    "b",
    "..",
    ".",
    "",
    ".wh.a",
    ".wh..wh..opq",
    ".wh..",
    ".wh...",
    ".wh.",
    "/",
    "lnk",
    "dev",
    "x/../../y",
    "\u{0}",
    "//",
    "a/",
    "./a",
    ".wh..wh..wh..opq",
];

fn path(u: &mut Unstructured, outside: &str) -> arbitrary::Result<String> {
    if u.ratio(1, 8)? {
        return Ok(format!(
            "{outside}/{}",
            PIECES[u.choose_index(PIECES.len())?]
        ));
    }
    let n = u.int_in_range(1..=4)?;
    let mut parts = vec![];
    for _ in 0..n {
        parts.push(PIECES[u.choose_index(PIECES.len())?]);
    }
    Ok(parts.join("/"))
}

/// Builds a tar of up to 12 entries from the fuzzer's choices, names written raw into the
/// header (the tar crate's own setters would refuse the interesting ones).
fn layer(u: &mut Unstructured, outside: &str) -> arbitrary::Result<Vec<u8>> {
    let mut out = vec![];
    for _ in 0..u.int_in_range(0..=12)? {
        let name = path(u, outside)?;
        let kind = [
            tar::EntryType::Regular,
            tar::EntryType::Directory,
            tar::EntryType::Symlink,
            tar::EntryType::Link,
            tar::EntryType::Char,
            tar::EntryType::Fifo,
            tar::EntryType::Block,
        ][u.choose_index(7)?];
        let body: Vec<u8> = if kind == tar::EntryType::Regular {
            let n = u.int_in_range(0..=64)?;
            u.bytes(n)?.to_vec()
        } else {
            vec![]
        };
        let mut h = tar::Header::new_gnu();
        let raw = name.as_bytes();
        let old = h.as_old_mut();
        let n = raw.len().min(old.name.len());
        old.name[..n].copy_from_slice(&raw[..n]);
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            let target = path(u, outside)?;
            let n = target.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&target.as_bytes()[..n]);
        }
        h.set_entry_type(kind);
        h.set_mode(u.int_in_range(0..=0o7777)?);
        h.set_uid(u.int_in_range(0..=70000)?);
        h.set_gid(u.int_in_range(0..=70000)?);
        h.set_mtime(u.arbitrary()?);
        h.set_size(body.len() as u64);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(u.int_in_range(0..=2)?).ok();
            h.set_device_minor(u.int_in_range(0..=2)?).ok();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&body);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

fn tree(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The layer unpacker, on a tar the fuzzer either writes raw (first byte even) or composes from
/// hostile names, links and whiteouts (odd). Whatever it accepts or refuses, nothing may
/// appear, change or vanish outside the layer's directory.
pub fn tar_whiteout(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temp dir");
    let layer_dir = tmp.path().join("layer");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&layer_dir).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("a"), b"keep").unwrap();
    std::fs::create_dir(outside.join("b")).unwrap();
    let before = tree(&outside);
    let tar = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut u = Unstructured::new(rest);
        match layer(&mut u, &outside.display().to_string()) {
            Ok(t) => t,
            Err(_) => return,
        }
    };
    let _ = warren_image::unpack::unpack_tar(&mut Cursor::new(tar), &layer_dir, "fuzz");
    let top: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top.len(), 2, "entries next to the layer: {top:?}");
    assert_eq!(
        tree(&outside),
        before,
        "the layer changed a directory next to it"
    );
    assert_eq!(std::fs::read(outside.join("a")).unwrap(), b"keep");
}

/// The objects `warren apply -f` reads and the daemon parses: the manifest reader of the CLI
/// (YAML documents routed by kind and name), then each object read as its kind, validated and
/// (autoscalers) compiled and evaluated at a few instants.
pub fn yaml_objects(data: &[u8]) {
    use warren_core::checkpoint::Checkpoint;
    use warren_core::commit::Commit;
    use warren_core::objects::{parse_manifest, PoolingAutoScaler, SandboxSet};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objs) = parse_manifest(text) else {
        return;
    };
    for o in objs {
        assert!(!o.name.is_empty());
        assert_eq!(
            o.doc.pointer("/metadata/name").and_then(|n| n.as_str()),
            Some(o.name.as_str())
        );
        let doc = o.doc;
        match o.collection {
            "sandboxsets" => {
                if let Ok(set) = serde_json::from_value::<SandboxSet>(doc) {
                    let _ = set.validate();
                }
            }
            "commits" => {
                if let Ok(c) = serde_json::from_value::<Commit>(doc) {
                    let _ = c.validate();
                }
            }
            "checkpoints" => {
                if let Ok(c) = serde_json::from_value::<Checkpoint>(doc) {
                    let _ = c.validate();
                }
            }
            "poolingautoscalers" => {
                if let Ok(a) = serde_json::from_value::<PoolingAutoScaler>(doc) {
                    if let Ok(policy) = a.compile() {
                        assert!(policy.min_replicas <= policy.max_replicas);
                        for t in [0, 1_700_000_000, 4_102_444_800] {
                            let now = chrono::DateTime::from_timestamp(t, 0).unwrap();
                            let (lo, hi, _) = warren_core::autoscaler::bounds_at(&policy, now);
                            assert!(lo <= hi, "bounds {lo} > {hi}");
                        }
                    }
                }
            }
            other => panic!("parse_manifest routed to unknown collection {other}"),
        }
    }
}
