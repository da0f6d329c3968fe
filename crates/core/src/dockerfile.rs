//! The Dockerfile subset of `warren template build`: `FROM` (one, a template or an image of the
//! local store), `RUN` (shell or JSON exec form), `COPY SRC... DST` (sources in the uploaded build
//! context), `ENV`, `WORKDIR`, `USER`, `CMD` and `ENTRYPOINT` (shell or JSON form), comments and
//! `\` continuations. Parsing is pure: it runs in the daemon (which decides) and in the CLI (which
//! only uses it to know which files the context must hold).

/// One instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Instr {
    From(String),
    /// A command line for `/bin/sh -c` (the JSON form is quoted into one).
    Run(String),
    Copy(Vec<String>, String),
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
    /// Argument vectors; the shell form is `["/bin/sh", "-c", text]`.
    Cmd(Vec<String>),
    Entrypoint(Vec<String>),
}

impl Instr {
    /// Whether the step changes the filesystem (and so runs in a sandbox and becomes a layer).
    pub fn makes_layer(&self) -> bool {
        matches!(self, Instr::Run(_) | Instr::Copy(..) | Instr::Workdir(_))
    }
}

/// One parsed instruction with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1-based line of its first line.
    pub line: usize,
    /// The instruction as written (continuations joined).
    pub text: String,
    pub instr: Instr,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct DockerfileError(pub String);

fn bad(msg: impl Into<String>) -> DockerfileError {
    DockerfileError(msg.into())
}

/// Parses the subset; errors name the line.
pub fn parse(text: &str) -> Result<Vec<Step>, DockerfileError> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (pending.is_empty() && line.is_empty()) {
            continue;
        }
        if pending.is_empty() {
            start = i + 1;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let instr = parse_one(start, &full)?;
        out.push(Step {
            line: start,
            text: full,
            instr,
        });
    }
    if !pending.is_empty() {
        return Err(bad(format!(
            "line {start}: the file ends inside a continued line"
        )));
    }
    match out.first() {
        Some(Step {
            instr: Instr::From(_),
            ..
        }) => {}
        Some(s) => {
            return Err(bad(format!(
                "line {}: the first instruction must be FROM",
                s.line
            )))
        }
        None => return Err(bad("no instructions")),
    }
    if let Some(s) = out
        .iter()
        .skip(1)
        .find(|s| matches!(s.instr, Instr::From(_)))
    {
        return Err(bad(format!(
            "line {}: only one FROM is supported (no multi-stage builds)",
            s.line
        )));
    }
    Ok(out)
}

fn quote(w: &str) -> String {
    format!("'{}'", w.replace('\'', r"'\''"))
}

/// The JSON form (`["a", "b"]`) or the shell form (`/bin/sh -c TEXT`) of RUN, CMD, ENTRYPOINT.
fn argv(n: usize, word: &str, rest: &str) -> Result<Vec<String>, DockerfileError> {
    if rest.starts_with('[') {
        let words: Vec<String> = serde_json::from_str(rest).map_err(|e| {
            bad(format!(
                "line {n}: {word}'s exec form must be a JSON array of strings: {e}"
            ))
        })?;
        if words.is_empty() {
            return Err(bad(format!("line {n}: {word} needs a command")));
        }
        Ok(words)
    } else {
        Ok(vec!["/bin/sh".into(), "-c".into(), rest.to_string()])
    }
}

/// Splits `rest` into words, honouring double and single quotes and backslash escapes.
fn words(n: usize, rest: &str) -> Result<Vec<String>, DockerfileError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = rest.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    Some(e) => cur.push(e),
                    None => cur.push('\\'),
                }
            }
            (_, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(bad(format!("line {n}: unterminated quote")));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn parse_one(n: usize, line: &str) -> Result<Instr, DockerfileError> {
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let upper = word.to_ascii_uppercase();
    let need = |what: &str| -> Result<(), DockerfileError> {
        if rest.is_empty() {
            return Err(bad(format!("line {n}: {upper} needs {what}")));
        }
        Ok(())
    };
    Ok(match upper.as_str() {
        "FROM" => {
            need("a template name")?;
            if rest.split_whitespace().count() != 1 {
                return Err(bad(format!(
                    "line {n}: FROM takes one template or image name (no AS, no --platform)"
                )));
            }
            Instr::From(rest.to_string())
        }
        "RUN" => {
            need("a command")?;
            let a = argv(n, "RUN", rest)?;
            if rest.starts_with('[') {
                Instr::Run(a.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "))
            } else {
                Instr::Run(rest.to_string())
            }
        }
        "CMD" => {
            need("a command")?;
            Instr::Cmd(argv(n, "CMD", rest)?)
        }
        "ENTRYPOINT" => {
            need("a command")?;
            Instr::Entrypoint(argv(n, "ENTRYPOINT", rest)?)
        }
        "COPY" => {
            if rest.starts_with("--") {
                return Err(bad(format!(
                    "line {n}: COPY options (--chown, --from...) are not supported"
                )));
            }
            let parts = if rest.starts_with('[') {
                serde_json::from_str::<Vec<String>>(rest).map_err(|e| {
                    bad(format!(
                        "line {n}: COPY's JSON form must be an array of strings: {e}"
                    ))
                })?
            } else {
                words(n, rest)?
            };
            let Some((dst, srcs)) = parts.split_last().filter(|(_, s)| !s.is_empty()) else {
                return Err(bad(format!(
                    "line {n}: COPY needs at least one source and a destination"
                )));
            };
            for s in srcs {
                check_source(n, s)?;
            }
            Instr::Copy(srcs.to_vec(), dst.clone())
        }
        "ENV" => {
            need("KEY=VALUE")?;
            let first = rest.split_whitespace().next().unwrap_or("");
            let pairs: Vec<(String, String)> = if first.contains('=') {
                words(n, rest)?
                    .into_iter()
                    .map(|p| {
                        p.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .ok_or_else(|| {
                                bad(format!("line {n}: ENV {p:?} must be KEY=VALUE"))
                            })
                    })
                    .collect::<Result<_, _>>()?
            } else {
                let (k, v) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                    bad(format!("line {n}: ENV needs KEY=VALUE or KEY VALUE"))
                })?;
                vec![(k.to_string(), v.trim().to_string())]
            };
            for (k, v) in &pairs {
                let valid = !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !k.as_bytes()[0].is_ascii_digit();
                if !valid || v.contains('\0') {
                    return Err(bad(format!(
                        "line {n}: ENV {k:?}: names are letters, digits and '_', not starting with a digit"
                    )));
                }
            }
            Instr::Env(pairs)
        }
        "WORKDIR" => {
            need("a path")?;
            Instr::Workdir(rest.to_string())
        }
        "USER" => {
            need("a user")?;
            if rest.split_whitespace().count() != 1 {
                return Err(bad(format!("line {n}: USER takes one user name or uid")));
            }
            Instr::User(rest.to_string())
        }
        other => {
            return Err(bad(format!(
                "line {n}: unsupported instruction {other:?} (supported: FROM, RUN, COPY, ENV, WORKDIR, USER, CMD, ENTRYPOINT)"
            )))
        }
    })
}

/// COPY sources are paths inside the build context: relative, without `..`, no wildcards.
fn check_source(n: usize, s: &str) -> Result<(), DockerfileError> {
    let p = std::path::Path::new(s);
    if s.is_empty()
        || p.is_absolute()
        || p.components().any(|c| c == std::path::Component::ParentDir)
    {
        return Err(bad(format!(
            "line {n}: COPY {s}: sources must be relative paths inside the build context"
        )));
    }
    if s.contains(['*', '?', '[']) {
        return Err(bad(format!(
            "line {n}: COPY {s}: wildcards are not supported; name the files or a directory"
        )));
    }
    Ok(())
}

/// The normalised form of a COPY source inside the context: no `./`, no trailing `/`; `""` is
/// the whole context.
pub fn normalize_source(s: &str) -> String {
    std::path::Path::new(s)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(x) => Some(x.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Resolves a WORKDIR or COPY destination against the current working dir (Docker's rule: a
/// relative path is relative to the last WORKDIR, `/` if none).
pub fn resolve_path(cwd: Option<&str>, p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        let base = cwd.unwrap_or("/").trim_end_matches('/');
        format!("{base}/{p}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instrs(f: &str) -> Vec<Instr> {
        parse(f).unwrap().into_iter().map(|s| s.instr).collect()
    }

    #[test]
    fn parses_the_subset() {
        let f =
            "# comment\nFROM base\nRUN apt-get update && \\\n  echo hi\nRUN [\"echo\", \"a b\"]\n\
                 COPY a b /dst/\nENV A=1 B=\"two words\"\nENV C three\nWORKDIR /w\nUSER user\n\
                 CMD [\"python3\", \"-m\", \"http.server\"]\nENTRYPOINT exec tini\n";
        assert_eq!(
            instrs(f),
            vec![
                Instr::From("base".into()),
                Instr::Run("apt-get update &&  echo hi".into()),
                Instr::Run("'echo' 'a b'".into()),
                Instr::Copy(vec!["a".into(), "b".into()], "/dst/".into()),
                Instr::Env(vec![
                    ("A".into(), "1".into()),
                    ("B".into(), "two words".into())
                ]),
                Instr::Env(vec![("C".into(), "three".into())]),
                Instr::Workdir("/w".into()),
                Instr::User("user".into()),
                Instr::Cmd(vec!["python3".into(), "-m".into(), "http.server".into()]),
                Instr::Entrypoint(vec!["/bin/sh".into(), "-c".into(), "exec tini".into()]),
            ]
        );
        let s = parse("FROM base\n\nRUN a \\\n # inside\n  b\n").unwrap();
        assert_eq!(s[1].line, 3);
        assert_eq!(s[1].instr, Instr::Run("a  b".into()));
    }

    #[test]
    fn bad_files_name_the_line() {
        for (f, want) in [
            ("RUN x\n", "first instruction must be FROM"),
            (
                "FROM base\nEXPOSE 80\n",
                "line 2: unsupported instruction \"EXPOSE\"",
            ),
            ("FROM base\nCOPY --chown=1 a b\n", "line 2: COPY options"),
            ("FROM base\nCOPY a\n", "line 2: COPY needs"),
            (
                "FROM base\nCOPY ../a /x\n",
                "line 2: COPY ../a: sources must be",
            ),
            ("FROM base\nCOPY /etc /x\n", "sources must be relative"),
            ("FROM base\nCOPY *.py /x\n", "wildcards"),
            ("FROM base\nRUN\n", "line 2: RUN needs"),
            ("FROM base\nRUN [\"a\", 1]\n", "line 2: RUN's exec form"),
            ("FROM base\nENV 1A=x\n", "line 2: ENV \"1A\""),
            ("FROM base\nENV A=\"x\n", "unterminated quote"),
            ("FROM a\nFROM b\n", "line 2: only one FROM"),
            ("FROM base\nRUN a \\\n", "ends inside"),
            ("", "no instructions"),
        ] {
            let err = parse(f).unwrap_err().to_string();
            assert!(err.contains(want), "{f:?}: {err}");
        }
    }

    #[test]
    fn sources_and_paths() {
        assert_eq!(normalize_source("./src/"), "src");
        assert_eq!(normalize_source("."), "");
        assert_eq!(normalize_source("a//b"), "a/b");
        assert_eq!(resolve_path(None, "app"), "/app");
        assert_eq!(resolve_path(Some("/srv/"), "app"), "/srv/app");
        assert_eq!(resolve_path(Some("/srv"), "/abs"), "/abs");
    }
}
