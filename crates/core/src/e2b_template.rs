//! E2B's template definitions (what the e2b SDKs' `Template.build` sends to
//! `POST /v2/templates/{id}/builds/{build}`) translated into the steps of Warren's own template
//! builds (see [`crate::orchestrator`]'s builds and [`crate::dockerfile`]), so a template written
//! with the SDK's builder builds here unchanged. Pure: no I/O.
//!
//! The mapping:
//! - `fromTemplate: T` builds on Warren's template `T`; `fromImage: R` on an image template made
//!   from `R` (pulled, with `fromImageRegistry`'s credentials if given), except E2B's default
//!   base image `e2bdev/base`, which is Warren's `base` template. On E2B's bases the default user
//!   is `user`, so builds on `base` start with `USER user`, as E2B's do.
//! - `RUN [cmd, user?]`: a RUN, through `su` when it names a user (E2B runs that one command as
//!   the user, without changing the image's user).
//! - `COPY [src, dest, user?, mode?]` with `filesHash`: the uploaded files of that hash sit in
//!   the build context under `<hash>/`, so the COPY reads `<hash>/<src>`; a glob in the last
//!   part of `src` copies what was uploaded for it (the SDK uploads only the matches). `user`
//!   and `mode` become a `chown`/`chmod` RUN of what was copied.
//! - `ENV [k, v, ...]`, `WORKDIR [dir]`, `USER [user]`: the same instructions.
//! - `startCmd`: the template's start command (`CMD ["/bin/sh", "-c", startCmd]`).
//! - `readyCmd`: the SDKs' `wait_for_port` form makes a create wait for that port, as Warren's
//!   templates with a ready port do; any other (`wait_for_url`, `wait_for_process`,
//!   `wait_for_file`, `wait_for_timeout`) is run by each create until it exits 0.

use crate::dockerfile::{normalize_source, Instr, Step};
use serde::Deserialize;

/// The body of `POST /v2/templates/{templateID}/builds/{buildID}` (`TemplateBuildStartV2`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct E2bTemplateSpec {
    pub from_image: Option<String>,
    pub from_template: Option<String>,
    pub from_image_registry: Option<E2bRegistry>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    #[serde(default)]
    pub steps: Vec<E2bStep>,
    /// Rebuild every step (no cache).
    #[serde(default)]
    pub force: bool,
}

/// `fromImageRegistry`: only the generic registry with basic auth is served here (the cloud
/// ones need their providers' APIs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct E2bRegistry {
    #[serde(rename = "type")]
    pub kind: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct E2bStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub force: bool,
    pub files_hash: Option<String>,
}

/// What a build starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum E2bBase {
    /// A template of this daemon.
    Template(String),
    /// An image to make a template of first, with the registry's basic-auth credentials.
    Image {
        reference: String,
        credentials: Option<(String, String)>,
    },
}

/// A translated definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub base: E2bBase,
    /// The steps after `FROM` (which the caller adds once it knows the base template's name).
    pub steps: Vec<Step>,
    /// For each of `steps`, the E2B step name its failure is reported under: the 1-based index
    /// of the SDK's instruction (`"1"`…), or `"finalize"` for the start command.
    pub step_names: Vec<String>,
    /// The `filesHash` of every COPY, in order (each must have been uploaded).
    pub file_hashes: Vec<String>,
    /// The port the start command listens on, from `readyCmd`'s `wait_for_port` form.
    pub ready_port: Option<u16>,
    /// Any other `readyCmd`: a create runs it until it exits 0.
    pub ready_cmd: Option<String>,
    pub force: bool,
}

/// Why a definition cannot be built; the message says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct E2bTemplateError(pub String);

fn bad(msg: impl Into<String>) -> E2bTemplateError {
    E2bTemplateError(msg.into())
}

/// E2B's default base image, which Warren's `base` template stands in for.
const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// The base of a definition.
pub fn base_of(spec: &E2bTemplateSpec) -> Result<E2bBase, E2bTemplateError> {
    match (&spec.from_template, &spec.from_image) {
        (Some(_), Some(_)) => Err(bad("give one of fromTemplate and fromImage, not both")),
        (Some(t), None) if t.trim().is_empty() => Err(bad("fromTemplate is empty")),
        (Some(t), None) => Ok(E2bBase::Template(t.clone())),
        (None, Some(i)) if i.trim().is_empty() => Err(bad("fromImage is empty")),
        (None, Some(i)) => {
            let repo = i.split(['@', ':']).next().unwrap_or(i);
            let repo = repo
                .strip_prefix("docker.io/")
                .unwrap_or(repo)
                .trim_start_matches("library/");
            if repo == E2B_BASE_IMAGE {
                return Ok(E2bBase::Template("base".into()));
            }
            let credentials = match &spec.from_image_registry {
                None => None,
                Some(r) if r.kind == "registry" => match (&r.username, &r.password) {
                    (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                    _ => return Err(bad("fromImageRegistry: username and password are required")),
                },
                Some(r) => {
                    return Err(bad(format!(
                        "fromImageRegistry of type {:?} is not supported by Warren: use type \"registry\" with a username and password",
                        r.kind
                    )))
                }
            };
            Ok(E2bBase::Image {
                reference: i.clone(),
                credentials,
            })
        }
        (None, None) => Err(bad("one of fromTemplate and fromImage is required")),
    }
}

/// Quotes `s` for `/bin/sh` (single quotes; embedded ones closed, escaped and reopened).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn check_user(u: &str) -> Result<(), E2bTemplateError> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{u:?} is not a user name (letters, digits, '_', '-', '.')"
        )))
    }
}

fn check_mode(m: &str) -> Result<(), E2bTemplateError> {
    if !m.is_empty() && m.len() <= 5 && m.chars().all(|c| ('0'..='7').contains(&c)) {
        Ok(())
    } else {
        Err(bad(format!("{m:?} is not an octal file mode")))
    }
}

/// The port of the SDKs' `wait_for_port(p)` ready command: `[ -n "$(ss -Htuln sport = :p)" ]`
/// (older SDKs: `ss -tuln | grep :p`).
pub fn ready_port_of(cmd: &str) -> Option<u16> {
    let cmd = cmd.trim();
    if let Some(rest) = cmd.strip_prefix(r#"[ -n "$(ss -Htuln sport = :"#) {
        return rest.strip_suffix(r#")" ]"#)?.parse().ok();
    }
    let words: Vec<&str> = cmd.split_whitespace().collect();
    match words.as_slice() {
        ["ss", "-tuln", "|", "grep", port] => port.strip_prefix(':')?.parse().ok(),
        _ => None,
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The `line` of the start command's step (E2B's `finalize`).
const FINALIZE: usize = usize::MAX;

/// The steps made so far, and the user that RUN steps run as at this point.
#[derive(Default)]
struct Out {
    steps: Vec<Step>,
    file_hashes: Vec<String>,
    /// The image's user so far; `None`: unset, which Warren's builds run as root.
    user: Option<String>,
}

impl Out {
    /// Adds a step for E2B step `e2b_step` (its "line": 0 for the base, [`FINALIZE`]).
    fn push(&mut self, e2b_step: usize, text: String, instr: Instr) {
        if let Instr::User(u) = &instr {
            self.user = Some(u.clone());
        }
        self.steps.push(Step {
            line: e2b_step,
            text,
            instr,
        });
    }

    /// A RUN of `cmd` as `user` (the current user if `None`), leaving the image's user as it
    /// was: as root `su` switches for the one command; from another user, a USER step and back.
    fn run_as(&mut self, e2b_step: usize, user: Option<&str>, text: String, cmd: &str) {
        let current = self.user.clone().unwrap_or_else(|| "root".into());
        match user {
            Some(u) if u != current && current == "root" => {
                let run = format!("su -s /bin/sh {u} -c {}", sh_quote(cmd));
                self.push(e2b_step, text, Instr::Run(run));
            }
            Some(u) if u != current => {
                self.push(e2b_step, format!("USER {u}"), Instr::User(u.to_string()));
                self.push(e2b_step, text, Instr::Run(cmd.to_string()));
                self.push(e2b_step, format!("USER {current}"), Instr::User(current));
            }
            _ => self.push(e2b_step, text, Instr::Run(cmd.to_string())),
        }
    }
}

/// Translates the steps of `spec`. `is_single_file` answers, for an uploaded hash and a
/// normalised source path inside it, whether that source is one file (so `chown`/`chmod` know
/// what the COPY made).
pub fn translate(
    spec: &E2bTemplateSpec,
    is_single_file: impl Fn(&str, &str) -> bool,
) -> Result<Translated, E2bTemplateError> {
    let base = base_of(spec)?;
    let mut out = Out::default();
    if base == E2bBase::Template("base".into()) {
        out.push(0, "USER user".into(), Instr::User("user".into()));
    }
    let mut workdir: Option<String> = None;
    for (i, step) in spec.steps.iter().enumerate() {
        let at = |msg: String| bad(format!("step {} ({}): {msg}", i + 1, step.kind));
        let args = &step.args;
        match step.kind.as_str() {
            "RUN" => {
                let cmd = args
                    .first()
                    .filter(|c| !c.trim().is_empty())
                    .ok_or_else(|| at("needs a command".into()))?;
                let user = args.get(1).filter(|u| !u.is_empty());
                if let Some(u) = user {
                    check_user(u).map_err(|e| at(e.0))?;
                }
                out.run_as(i + 1, user.map(String::as_str), format!("RUN {cmd}"), cmd);
            }
            "COPY" => {
                let (src, dest) = match args.as_slice() {
                    [src, dest, ..] if !src.is_empty() && !dest.is_empty() => (src, dest),
                    _ => return Err(at("needs a source and a destination".into())),
                };
                let hash = step
                    .files_hash
                    .as_deref()
                    .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
                    .ok_or_else(|| at("needs the filesHash of its uploaded files".into()))?
                    .to_ascii_lowercase();
                let norm = normalize_source(src);
                let (dir, last) = match norm.rsplit_once('/') {
                    Some((d, l)) => (d.to_string(), l.to_string()),
                    None => (String::new(), norm.clone()),
                };
                if has_glob(&dir) {
                    return Err(at(format!(
                        "{src}: a wildcard is only supported in the last part of the path"
                    )));
                }
                let source = if has_glob(&last) {
                    // The upload holds just the matches, under their own names.
                    if dir.is_empty() {
                        hash.clone()
                    } else {
                        format!("{hash}/{dir}")
                    }
                } else if norm.is_empty() {
                    hash.clone()
                } else {
                    format!("{hash}/{norm}")
                };
                let dest_abs = format!(
                    "/{}",
                    normalize_source(&crate::dockerfile::resolve_path(workdir.as_deref(), dest))
                );
                let (user, mode) = (
                    args.get(2).filter(|u| !u.is_empty()),
                    args.get(3).filter(|m| !m.is_empty()),
                );
                // What the COPY made, for chown/chmod only (finding out reads the upload).
                let made = if (user.is_some() || mode.is_some())
                    && !has_glob(&last)
                    && !norm.is_empty()
                    && dest.ends_with('/')
                    && is_single_file(&hash, &norm)
                {
                    format!("{}/{last}", dest_abs.trim_end_matches('/'))
                } else {
                    dest_abs.clone()
                };
                out.push(
                    i + 1,
                    format!("COPY {src} {dest}"),
                    Instr::Copy(vec![source], dest.clone()),
                );
                out.file_hashes.push(hash);
                if let Some(user) = user {
                    check_user(user).map_err(|e| at(e.0))?;
                    out.run_as(
                        i + 1,
                        Some("root"),
                        format!("RUN chown -R {user} {made}"),
                        &format!("chown -R {user}: {}", sh_quote(&made)),
                    );
                }
                if let Some(mode) = mode {
                    check_mode(mode).map_err(|e| at(e.0))?;
                    out.run_as(
                        i + 1,
                        Some("root"),
                        format!("RUN chmod -R {mode} {made}"),
                        &format!("chmod -R {mode} {}", sh_quote(&made)),
                    );
                }
            }
            "ENV" => {
                if args.is_empty() || args.len() % 2 != 0 {
                    return Err(at("needs key and value pairs".into()));
                }
                let mut pairs = Vec::new();
                for kv in args.chunks(2) {
                    if kv[0].is_empty() || kv[0].contains(['=', ' ']) {
                        return Err(at(format!("{:?} is not a variable name", kv[0])));
                    }
                    pairs.push((kv[0].clone(), kv[1].clone()));
                }
                let text = pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                out.push(i + 1, format!("ENV {text}"), Instr::Env(pairs));
            }
            "WORKDIR" => {
                let dir = args
                    .first()
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| at("needs a directory".into()))?;
                workdir = Some(crate::dockerfile::resolve_path(workdir.as_deref(), dir));
                out.push(i + 1, format!("WORKDIR {dir}"), Instr::Workdir(dir.clone()));
            }
            "USER" => {
                let user = args
                    .first()
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| at("needs a user".into()))?;
                check_user(user).map_err(|e| at(e.0))?;
                out.push(i + 1, format!("USER {user}"), Instr::User(user.clone()));
            }
            other => {
                return Err(bad(format!(
                    "step {}: unknown instruction {other:?}",
                    i + 1
                )))
            }
        }
    }
    let (mut ready_port, mut ready_cmd) = (None, None);
    if let Some(ready) = spec.ready_cmd.as_deref().filter(|c| !c.trim().is_empty()) {
        if spec.start_cmd.is_none() {
            return Err(bad("readyCmd needs a startCmd"));
        }
        match ready_port_of(ready) {
            Some(port) => ready_port = Some(port),
            None => ready_cmd = Some(ready.to_string()),
        }
    }
    if let Some(start) = spec.start_cmd.as_deref().filter(|c| !c.trim().is_empty()) {
        out.push(
            FINALIZE,
            format!("CMD {start}"),
            Instr::Cmd(vec!["/bin/sh".into(), "-c".into(), start.to_string()]),
        );
    }
    Ok(Translated {
        base,
        step_names: out
            .steps
            .iter()
            .map(|s| match s.line {
                0 => "base".to_string(),
                FINALIZE => "finalize".to_string(),
                n => n.to_string(),
            })
            .collect(),
        steps: out.steps,
        file_hashes: out.file_hashes,
        ready_port,
        ready_cmd,
        force: spec.force || spec.steps.iter().any(|s| s.force),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn spec(json: serde_json::Value) -> E2bTemplateSpec {
        serde_json::from_value(json).unwrap()
    }

    fn instrs(t: &Translated) -> Vec<Instr> {
        t.steps.iter().map(|s| s.instr.clone()).collect()
    }

    #[test]
    fn the_sdk_default_base_is_warrens_base_with_its_user() {
        let t = translate(
            &spec(
                serde_json::json!({"fromImage": "e2bdev/base:latest", "steps": [], "force": false}),
            ),
            |_, _| false,
        )
        .unwrap();
        assert_eq!(t.base, E2bBase::Template("base".into()));
        assert_eq!(instrs(&t), vec![Instr::User("user".into())]);
    }

    #[test]
    fn steps_translate_in_order() {
        let t = translate(
            &spec(serde_json::json!({
                "fromTemplate": "mine",
                "steps": [
                    {"type": "WORKDIR", "args": ["/app"], "force": false},
                    {"type": "RUN", "args": ["echo 'hi' > x", "user"], "force": false},
                    {"type": "COPY", "args": ["conf/a.txt", "./", "user", "0640"], "force": false, "filesHash": H},
                    {"type": "COPY", "args": ["src/*.py", "/py/"], "force": true, "filesHash": H},
                    {"type": "ENV", "args": ["A", "1", "B", "two words"], "force": false},
                ],
                "startCmd": "python3 -m http.server 8000",
                "readyCmd": "ss -tuln | grep :8000",
                "force": false
            })),
            |hash, src| hash == H && src == "conf/a.txt",
        )
        .unwrap();
        assert_eq!(t.base, E2bBase::Template("mine".into()));
        assert_eq!(
            instrs(&t),
            vec![
                Instr::Workdir("/app".into()),
                Instr::Run("su -s /bin/sh user -c 'echo '\\''hi'\\'' > x'".into()),
                Instr::Copy(vec![format!("{H}/conf/a.txt")], "./".into()),
                Instr::Run("chown -R user: '/app/a.txt'".into()),
                Instr::Run("chmod -R 0640 '/app/a.txt'".into()),
                Instr::Copy(vec![format!("{H}/src")], "/py/".into()),
                Instr::Env(vec![
                    ("A".into(), "1".into()),
                    ("B".into(), "two words".into())
                ]),
                Instr::Cmd(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "python3 -m http.server 8000".into()
                ]),
            ]
        );
        assert_eq!(
            t.step_names,
            vec!["1", "2", "3", "3", "3", "4", "5", "finalize"]
        );
        assert_eq!(t.file_hashes, vec![H.to_string(), H.to_string()]);
        assert_eq!(t.ready_port, Some(8000));
        assert!(t.force, "a step's force forces the build");
    }

    #[test]
    fn a_run_as_root_on_the_user_base_switches_and_back() {
        let t = translate(
            &spec(serde_json::json!({"fromTemplate": "base", "steps": [
                {"type": "RUN", "args": ["apt-get update", "root"]},
                {"type": "RUN", "args": ["whoami"]},
            ]})),
            |_, _| false,
        )
        .unwrap();
        assert_eq!(
            instrs(&t),
            vec![
                Instr::User("user".into()),
                Instr::User("root".into()),
                Instr::Run("apt-get update".into()),
                Instr::User("user".into()),
                Instr::Run("whoami".into()),
            ]
        );
        assert_eq!(t.step_names, vec!["base", "1", "1", "1", "2"]);
    }

    #[test]
    fn bad_definitions_say_what_is_wrong() {
        let err = |v: serde_json::Value| translate(&spec(v), |_, _| false).unwrap_err().0;
        assert!(err(serde_json::json!({"steps": []})).contains("fromTemplate and fromImage"));
        assert!(err(serde_json::json!({"fromTemplate": "t", "steps": [{"type": "COPY", "args": ["a", "/b"]}]}))
            .contains("filesHash"));
        assert!(err(serde_json::json!({"fromTemplate": "t", "steps": [{"type": "RUN", "args": ["x", "bad user"]}]}))
            .contains("not a user name"));
        assert!(err(
            serde_json::json!({"fromTemplate": "t", "steps": [{"type": "ENV", "args": ["A"]}]})
        )
        .contains("pairs"));
        assert!(err(
            serde_json::json!({"fromTemplate": "t", "steps": [{"type": "ADD", "args": []}]})
        )
        .contains("unknown instruction"));
        assert!(
            err(serde_json::json!({"fromTemplate": "t", "steps": [], "readyCmd": "true"}))
                .contains("needs a startCmd")
        );
        assert!(err(
            serde_json::json!({"fromImage": "x", "fromImageRegistry": {"type": "aws"}, "steps": []})
        )
        .contains("not supported"));
        assert!(err(serde_json::json!({"fromTemplate": "t", "steps": [{"type": "COPY", "args": ["a/*/b", "/b"], "filesHash": H}]}))
            .contains("wildcard"));
    }

    #[test]
    fn ready_commands() {
        assert_eq!(ready_port_of("ss -tuln | grep :3000"), Some(3000));
        assert_eq!(
            ready_port_of(r#"[ -n "$(ss -Htuln sport = :8080)" ]"#),
            Some(8080)
        );
        assert_eq!(ready_port_of("ss -tuln | grep 3000"), None);
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }
}
