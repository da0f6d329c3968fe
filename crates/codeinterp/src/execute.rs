//! One `POST /execute`: runs a cell in a context's kernel and turns its iopub messages into NDJSON
//! lines for the response body, as they come.
//!
//! Output is streamed with backpressure, end to end: lines wait in a queue bounded in bytes, and
//! while it is full the execution stops reading the kernel's messages. The kernel's iopub socket
//! then fills up to its high-water mark and, because `kernel_launch.py` made it blocking
//! (ZMQ_XPUB_NODROP) and its stdout publish in small pieces, the code that prints waits. So
//! endless or huge output costs bounded memory on both sides and nothing is lost, however slow
//! the client. When the client goes away (disconnect, or the SDK's own timeout) the kernel is
//! interrupted; a kernel that dies is reported and replaced.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::contexts::Context;
use crate::kernel::{Kernel, Language};
use crate::output::{map_iopub, Event, Line};
use crate::wire::Message;

/// Bytes of output lines that may wait for a slow client before the kernel is made to wait.
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// How long output of a Deno cell is still taken after its `idle`: Deno's kernel publishes a
/// cell's `execute_result` (and stream output) on a path of its own, which now and then
/// overtakes `idle` (in about 2% of `1+1` runs here, by 0.05-2 ms).
const DENO_LINGER: Duration = Duration::from_millis(30);
/// How long an interrupted kernel gets to go idle before it is killed and replaced.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

struct Outbox {
    tx: mpsc::Sender<Bytes>,
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

impl Outbox {
    fn new(tx: mpsc::Sender<Bytes>) -> Outbox {
        Outbox {
            tx,
            pending: VecDeque::new(),
            pending_bytes: 0,
        }
    }

    fn push(&mut self, line: &Line) {
        let bytes = line.to_bytes();
        self.pending_bytes += bytes.len();
        self.pending.push_back(bytes);
    }

    /// True while no more kernel output should be taken. One line is always taken, however
    /// big, so that any single output can be delivered.
    fn is_full(&self) -> bool {
        self.pending_bytes >= MAX_PENDING_BYTES
    }

    /// Hands queued lines to the response body while it has room. False once the client is gone.
    fn flush(&mut self) -> bool {
        while let Some(b) = self.pending.pop_front() {
            let len = b.len();
            match self.tx.try_send(b) {
                Ok(()) => self.pending_bytes -= len,
                Err(mpsc::error::TrySendError::Full(b)) => {
                    self.pending.push_front(b);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        !self.tx.is_closed()
    }

    /// Sends everything queued, waiting for the client. False if it went away.
    async fn drain(&mut self) -> bool {
        while let Some(b) = self.pending.pop_front() {
            self.pending_bytes -= b.len();
            if self.tx.send(b).await.is_err() {
                return false;
            }
        }
        true
    }
}

enum Outcome {
    Idle,
    ClientGone,
    Died(String),
}

/// Forwards the messages of one request to `out` until the kernel is idle, dies or the client
/// leaves. With `out` = None (silent helper requests) output is discarded.
async fn drive(
    kernel: &Kernel,
    rx: &mut mpsc::Receiver<Message>,
    mut out: Option<&mut Outbox>,
) -> Outcome {
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        let (tx, waiting, full) = match out.as_deref_mut() {
            Some(o) => {
                if !o.flush() {
                    return Outcome::ClientGone;
                }
                (Some(o.tx.clone()), !o.pending.is_empty(), o.is_full())
            }
            None => (None, false, false),
        };
        let closed = async {
            match &tx {
                Some(tx) => tx.closed().await,
                None => std::future::pending().await,
            }
        };
        let room = async {
            match &tx {
                Some(tx) if waiting => {
                    let _ = tx.reserve().await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = closed => return Outcome::ClientGone,
            _ = room => continue,
            // Backpressure: not reading makes the kernel wait (see the module doc).
            _ = async { tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)).await },
                if linger.is_some() => return Outcome::Idle,
            m = rx.recv(), if !full => match m {
                Some(m) => match map_iopub(&m) {
                    Event::Idle if kernel.language.is_deno() && linger.is_none() => {
                        linger = Some(tokio::time::Instant::now() + DENO_LINGER);
                    }
                    Event::Idle => return Outcome::Idle,
                    Event::Output(line) => {
                        if let Some(o) = out.as_deref_mut() {
                            o.push(&line);
                        }
                    }
                    Event::Ignore => {}
                },
                // The kernel object is gone (context removed or restarted).
                None => return Outcome::Died(kernel.exit_reason()),
            },
            _ = kernel.exited() => return Outcome::Died(kernel.exit_reason()),
        }
    }
}

/// Runs a helper request (env setup and reset) and waits for it to finish.
async fn run_silent(kernel: &Kernel, code: &str) -> Result<(), String> {
    let (id, mut rx) = kernel
        .execute(code, true)
        .await
        .map_err(|e| e.to_string())?;
    let r = drive(kernel, &mut rx, None).await;
    kernel.unroute(&id);
    match r {
        Outcome::Idle => Ok(()),
        Outcome::Died(why) => Err(why),
        Outcome::ClientGone => Ok(()),
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn valid_shell_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Checks the names of per-execution env vars for `language`.
pub fn validate_envs(language: Language, envs: &BTreeMap<String, String>) -> Result<(), String> {
    for k in envs.keys() {
        let ok = match language {
            Language::Python | Language::JavaScript | Language::TypeScript => {
                !k.is_empty() && !k.contains('=') && !k.contains('\0')
            }
            Language::Bash => valid_shell_name(k),
        };
        if !ok {
            return Err(format!("invalid environment variable name {k:?}"));
        }
    }
    Ok(())
}

/// Code that sets `envs` for the next execution, and code that puts back what was there before.
fn env_code(language: Language, envs: &BTreeMap<String, String>) -> (String, String) {
    let json = serde_json::to_string(envs).unwrap_or_default();
    match language {
        Language::Python => (
            format!(
                "import os as __warren_os, json as __warren_json\n\
                 __warren_new = __warren_json.loads({})\n\
                 __warren_saved = {{k: __warren_os.environ.get(k) for k in __warren_new}}\n\
                 __warren_os.environ.update(__warren_new)\n",
                serde_json::to_string(&json).unwrap_or_default()
            ),
            "for __warren_k, __warren_v in __warren_saved.items():\n    \
             if __warren_v is None: __warren_os.environ.pop(__warren_k, None)\n    \
             else: __warren_os.environ[__warren_k] = __warren_v\n\
             del __warren_saved, __warren_new\n"
                .to_string(),
        ),
        // `globalThis`, not a `const`: a cell's top-level declarations persist in Deno's REPL.
        Language::JavaScript | Language::TypeScript => (
            format!(
                "globalThis.__warren_new = {json};\n\
                 globalThis.__warren_saved = Object.fromEntries(Object.keys(__warren_new)\
                 .map((k) => [k, Deno.env.get(k)]));\n\
                 for (const [k, v] of Object.entries(__warren_new)) Deno.env.set(k, v);\n"
            ),
            "for (const [k, v] of Object.entries(globalThis.__warren_saved)) \
             { if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v); }\n\
             delete globalThis.__warren_saved; delete globalThis.__warren_new;\n"
                .to_string(),
        ),
        Language::Bash => {
            let mut set = String::new();
            let mut reset = String::new();
            for (k, v) in envs {
                set += &format!(
                    "if [ -n \"${{{k}+x}}\" ]; then __warren_had_{k}=1; __warren_old_{k}=\"${k}\"; \
                     else unset __warren_had_{k}; fi; export {k}={}\n",
                    sh_quote(v)
                );
                reset += &format!(
                    "if [ -n \"${{__warren_had_{k}+x}}\" ]; then export {k}=\"$__warren_old_{k}\"; \
                     else unset {k}; fi; unset __warren_had_{k} __warren_old_{k}\n"
                );
            }
            (set, reset)
        }
    }
}

/// Runs `code` in `ctx` and streams its NDJSON lines into `tx` (the response body).
pub async fn run(
    ctx: Arc<Context>,
    code: String,
    envs: BTreeMap<String, String>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut out = Outbox::new(tx);
    // Cells of one context run one after the other; a client that leaves while waiting never
    // runs its cell.
    let _turn = tokio::select! {
        g = ctx.exec.lock() => g,
        _ = out.tx.closed() => return,
    };
    let kernel = tokio::select! {
        k = ctx.kernel() => k,
        _ = out.tx.closed() => return,
    };
    let kernel = match kernel {
        Ok(k) => k,
        Err(e) => {
            out.push(&Line::error("KernelStartError", e.to_string()));
            out.push(&Line::EndOfExecution);
            out.drain().await;
            return;
        }
    };

    let (setup, reset) = env_code(ctx.language, &envs);
    if !envs.is_empty() {
        if let Err(why) = run_silent(&kernel, &setup).await {
            died(&ctx, &mut out, &why).await;
            return;
        }
    }
    let started = std::time::Instant::now();
    let (id, mut rx) = match kernel.execute(&code, false).await {
        Ok(x) => x,
        Err(e) => {
            died(&ctx, &mut out, &e.to_string()).await;
            return;
        }
    };
    let sent = started.elapsed();
    let outcome = drive(&kernel, &mut rx, Some(&mut out)).await;
    let idle = started.elapsed();
    match outcome {
        Outcome::Idle => {}
        Outcome::Died(why) => {
            kernel.unroute(&id);
            died(&ctx, &mut out, &why).await;
            return;
        }
        Outcome::ClientGone => {
            tracing::info!(context = %ctx.id, "client went away: interrupting the kernel");
            kernel.interrupt().await;
            let finished =
                tokio::time::timeout(INTERRUPT_GRACE, drive(&kernel, &mut rx, None)).await;
            if !matches!(finished, Ok(Outcome::Idle)) {
                tracing::warn!(context = %ctx.id, "kernel did not stop after an interrupt: restarting it");
                kernel.unroute(&id);
                kernel.kill();
                // Keep the turn until it is really gone, so the next cell never gets it.
                let _ = tokio::time::timeout(INTERRUPT_GRACE, kernel.exited()).await;
                ctx.prestart();
                return;
            }
        }
    }
    kernel.unroute(&id);
    if !envs.is_empty() {
        if let Err(why) = run_silent(&kernel, &reset).await {
            died(&ctx, &mut out, &why).await;
            return;
        }
    }
    out.push(&Line::EndOfExecution);
    out.drain().await;
    // Where a round trip's time goes (bench/codeinterp.py): sending the request, the kernel's
    // work until `idle`, and handing the last lines to the response body.
    tracing::debug!(
        context = %ctx.id,
        send_us = sent.as_micros() as u64,
        to_idle_us = idle.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "execution timing"
    );
}

async fn died(ctx: &Arc<Context>, out: &mut Outbox, why: &str) {
    tracing::warn!(context = %ctx.id, reason = why, "kernel died during an execution");
    out.push(&Line::error(
        "DeadKernelError",
        format!(
            "the kernel died while running this code ({why}); a new kernel is starting, the \
             context's state is lost"
        ),
    ));
    out.push(&Line::UnexpectedEndOfExecution);
    out.drain().await;
    // The next execution should find a fresh kernel ready.
    ctx.prestart();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_fills_and_drains() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut o = Outbox::new(tx);
        let chunk = Line::Stdout {
            text: "x".repeat(64 << 10),
            timestamp: String::new(),
        };
        let mut pushed = 0;
        while !o.is_full() {
            o.push(&chunk);
            pushed += 1;
        }
        // Full at the bound, not before, and never more than one line past it.
        let line = chunk.to_bytes().len();
        assert!(o.pending_bytes >= MAX_PENDING_BYTES);
        assert!(o.pending_bytes < MAX_PENDING_BYTES + line);
        // The body channel takes two lines; the rest waits, nothing is dropped.
        assert!(o.flush());
        assert_eq!(o.pending.len(), pushed - 2);
        rx.try_recv().unwrap();
        assert!(o.flush());
        assert_eq!(o.pending.len(), pushed - 3);
        drop(rx);
        assert!(!o.flush(), "a gone client is noticed");
    }

    #[test]
    fn env_code_quotes() {
        let mut envs = BTreeMap::new();
        envs.insert("A".to_string(), "it's \"x\"\n".to_string());
        let (set, reset) = env_code(Language::Bash, &envs);
        assert!(set.contains(
            r#"export A='it'\''s "x"
'"#
        ));
        assert!(reset.contains("unset A"));
        let (set, _) = env_code(Language::Python, &envs);
        assert!(
            set.contains(r#"loads("{\"A\":\"it's \\\"x\\\"\\n\"}")"#),
            "{set}"
        );
        assert!(validate_envs(Language::Bash, &envs).is_ok());
        envs.insert("1BAD".into(), String::new());
        assert!(validate_envs(Language::Bash, &envs).is_err());
        assert!(validate_envs(Language::Python, &envs).is_ok());
    }
}
