//! Starting user processes without copying envd's address space.
//!
//! `fork` of a multi-threaded process copies its page tables and then pays copy-on-write faults
//! and TLB shoot-downs on every CPU its threads ran on, in parent and child, until the child
//! execs: on this machine that was a third of the CPU a `commands.run("true")` costs. Like glibc's
//! `posix_spawn`, this module starts the child with `clone(CLONE_VM | CLONE_VFORK)` on a stack of
//! its own: the child shares envd's memory until it execs, and envd's calling thread waits that
//! long. `posix_spawn` itself cannot be used because the child must change uid, gid and groups.
//!
//! The child runs only raw system calls on data prepared before the clone. It must not call
//! glibc's `setuid` family: in a process glibc believes multi-threaded, those broadcast the
//! change to every thread, and in a child sharing envd's memory that would reach envd's threads.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the child's stdin, stdout and stderr are.
pub enum ChildStdio {
    /// Pipes to envd; stdin is `/dev/null` unless `stdin`.
    Pipes { stdin: bool },
    /// A PTY slave for all three, which becomes the controlling terminal.
    Pty(OwnedFd),
}

/// Everything the child does between clone and exec, prepared by the parent.
pub struct SpawnRequest {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// `Some((uid, gid, groups))` to switch credentials (envd runs as root).
    pub credentials: Option<(u32, u32, Vec<u32>)>,
    pub stdio: ChildStdio,
}

/// envd's ends of a started child's stdio.
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The child's whole world, behind one pointer: only read by the child, all of it owned by
/// the parent's stack frame that waits for the child to exec.
struct ChildPlan {
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    /// (source fd, target fd) for stdin, stdout, stderr.
    dups: [RawFd; 3],
    controlling_tty: bool,
    credentials: Option<(u32, u32, Vec<u32>)>,
    reset_signals_below: libc::c_int,
    /// Where the child reports a failure (errno) before `_exit`; close-on-exec.
    error_fd: RawFd,
}

fn cstring(s: impl AsRef<[u8]>, what: &str) -> io::Result<CString> {
    CString::new(s.as_ref().to_vec()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The program to exec: as given when it has a slash, else the first executable file named so
/// in the child's `PATH` (what `execvp` does, decided before the clone).
fn resolve(program: &str, env: &[(String, String)]) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

const CHILD_STACK: usize = 64 * 1024;

/// Starts the child; returns once it has exec'd (or failed to, with the reason).
pub fn spawn(req: SpawnRequest) -> io::Result<Spawned> {
    let program = resolve(&req.program, &req.env)?;
    let path = cstring(program.as_os_str().as_bytes(), "program")?;
    let args: Vec<CString> = std::iter::once(req.program.as_str())
        .chain(req.args.iter().map(String::as_str))
        .map(|a| cstring(a, "argument"))
        .collect::<io::Result<_>>()?;
    let env: Vec<CString> = req
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}"), "environment variable"))
        .collect::<io::Result<_>>()?;
    let cwd = cstring(OsStr::new(&req.cwd).as_bytes(), "cwd")?;

    // envd's ends, and the child's ends (kept open here until the child has exec'd).
    let (mut ours_in, mut ours_out, mut ours_err) = (None, None, None);
    let child_fds: Vec<OwnedFd>;
    let dups: [RawFd; 3];
    let controlling_tty;
    match req.stdio {
        ChildStdio::Pipes { stdin } => {
            let child_in = if stdin {
                let (r, w) = pipe()?;
                ours_in = Some(w);
                r
            } else {
                std::fs::File::open("/dev/null")?.into()
            };
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            ours_out = Some(out_r);
            ours_err = Some(err_r);
            dups = [child_in.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
            child_fds = vec![child_in, out_w, err_w];
            controlling_tty = false;
        }
        ChildStdio::Pty(slave) => {
            dups = [slave.as_raw_fd(); 3];
            child_fds = vec![slave];
            controlling_tty = true;
        }
    }
    let (error_r, error_w) = pipe()?;

    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let plan = ChildPlan {
        path,
        argv,
        envp,
        cwd,
        dups,
        controlling_tty,
        credentials: req.credentials,
        reset_signals_below: libc::SIGRTMIN(),
        error_fd: error_w.as_raw_fd(),
    };

    let mut stack = vec![0u8; CHILD_STACK];
    // Stacks grow down on every architecture Warren runs on; keep the top 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    // No signal handler of envd may run in the child: block everything across the clone (the
    // child resets dispositions, then unblocks, just before exec).
    // SAFETY: an all-zero sigset_t is valid storage for sigfillset/pthread_sigmask to fill.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut saved: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid, writable sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
    }
    // SAFETY: `child_main` only reads `plan`, which outlives the call: CLONE_VFORK suspends this
    // thread until the child has exec'd or exited, and the stack is ours alone for that time.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &plan as *const ChildPlan as *mut libc::c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
    drop(stack);
    drop(child_fds);
    drop(error_w);
    if pid < 0 {
        return Err(clone_error);
    }
    // An exec that worked closed the error pipe without writing.
    let mut errno = [0u8; 4];
    let mut error_file = std::fs::File::from(error_r);
    use std::io::Read;
    if let Ok(4) = error_file.read(&mut errno) {
        // The child has exited (127); the reaper collects it as an orphan.
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(Spawned {
        pid: pid as u32,
        stdin: ours_in,
        stdout: ours_out,
        stderr: ours_err,
    })
}

/// The child: raw system calls only (see the module docs), then exec.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `&ChildPlan`, alive and unchanged while we run.
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: every call is a plain system call on data in `plan`; see the module docs.
    unsafe {
        let fail = |plan: &ChildPlan| -> ! {
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(plan.error_fd, bytes.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        for signal in 1..plan.reset_signals_below {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        for (target, &source) in plan.dups.iter().enumerate() {
            let target = target as RawFd;
            if source == target {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(source, libc::F_SETFD, 0) < 0 {
                    fail(plan);
                }
            } else if libc::dup2(source, target) < 0 {
                fail(plan);
            }
        }
        // A new session: the child leads its process group (signals reach all it starts) and
        // has no controlling terminal but its PTY.
        if libc::setsid() < 0 {
            fail(plan);
        }
        if plan.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(plan);
        }
        if let Some((uid, gid, groups)) = &plan.credentials {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) < 0
                || libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) < 0
            {
                fail(plan);
            }
        }
        // After the switch, so that the user's own permissions decide.
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            fail(plan);
        }
        // Nothing of envd's but stdio reaches the program, whatever was opened without
        // O_CLOEXEC. Failure (an old kernel) is harmless: envd opens everything close-on-exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        // The error pipe must survive that until exec closes it.
        libc::fcntl(plan.error_fd, libc::F_SETFD, libc::FD_CLOEXEC);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const libc::sigset_t,
            std::ptr::null_mut::<libc::sigset_t>(),
            std::mem::size_of::<libc::c_ulong>(),
        );
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn wait(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: status is a valid int for waitpid to fill.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        status
    }

    fn run(program: &str, args: &[&str], stdin: bool) -> (String, String, i32) {
        let s = spawn(SpawnRequest {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("X".into(), "from-env".into()),
            ],
            cwd: "/tmp".into(),
            credentials: None,
            stdio: ChildStdio::Pipes { stdin },
        })
        .unwrap();
        drop(s.stdin);
        let mut out = String::new();
        std::fs::File::from(s.stdout.unwrap())
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        std::fs::File::from(s.stderr.unwrap())
            .read_to_string(&mut err)
            .unwrap();
        (out, err, wait(s.pid))
    }

    #[test]
    fn runs_with_env_cwd_pipes_and_a_new_session() {
        let (out, err, status) = run(
            "sh",
            &[
                "-c",
                "echo $X; pwd; echo oops >&2; ps -o sid= -p $$ | tr -d ' '; echo $$; exit 3",
            ],
            false,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..2], ["from-env", "/tmp"]);
        assert_eq!(lines[2], lines[3], "the child leads its own session");
        assert_eq!(err, "oops\n");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3);
    }

    #[test]
    fn stdin_is_dev_null_unless_asked_and_no_fd_leaks() {
        let (out, _, _) = run("sh", &["-c", "cat; ls /proc/self/fd | wc -l"], false);
        // cat read EOF at once; ls sees 0, 1, 2 and its own directory fd.
        assert_eq!(out.trim(), "4");
    }

    #[test]
    fn failures_are_reported_with_their_errno() {
        let e = spawn(SpawnRequest {
            program: "definitely-not-a-program".into(),
            args: vec![],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            credentials: None,
            stdio: ChildStdio::Pipes { stdin: false },
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = spawn(SpawnRequest {
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            cwd: "/no/such/dir".into(),
            credentials: None,
            stdio: ChildStdio::Pipes { stdin: false },
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(matches!(
            spawn(SpawnRequest {
                program: "/bin/true".into(),
                args: vec!["a\0b".into()],
                env: vec![],
                cwd: "/".into(),
                credentials: None,
                stdio: ChildStdio::Pipes { stdin: false },
            }),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput
        ));
    }
}
