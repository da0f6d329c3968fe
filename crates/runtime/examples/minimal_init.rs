//! A stand-in for `warren-envd init` used by the runtime's own real-kernel tests: it builds the
//! sandbox exactly as envd does, then answers every HTTP request with 204, and reaps orphans as a
//! PID 1 must. This keeps the runtime's tests (and the node agent's, which build it as
//! `agent_init`) independent of envd's API.

use std::io::{Read, Write};

fn main() {
    if std::env::args().nth(1).as_deref() != Some("init") {
        eprintln!("usage: minimal_init init");
        std::process::exit(2);
    }
    warren_runtime::init::run_sandbox_init(|_settings, listener| {
        std::thread::spawn(|| loop {
            // SAFETY: waitpid with a null status pointer; reaps any exited child.
            let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
            if pid < 0 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            // What it was asked, for a test to read in the sandbox's /tmp (the node agent's fork
            // test checks its `POST /init` this way).
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/tmp/envd-requests")
            {
                let _ = log.write_all(&buf[..n]);
                let _ = log.write_all(b"\n");
            }
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
        Ok(())
    })
}
