//! Syscalls a server makes while a scenario measures it, counted by `perf stat` on the
//! `raw_syscalls:sys_enter` tracepoint (Linux's perf tool; needs the tracepoint to be readable,
//! as for root). Off unless asked for: the counting itself costs the server a little.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Count the server's syscalls in every scenario run by this process from now on.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A running count; [`Counter::finish`] stops it and returns the total.
pub struct Counter {
    perf: Child,
}

impl Counter {
    /// Starts counting `pid`'s syscalls when counting is enabled. An error when perf cannot be
    /// started (not installed, say); the caller reports it and goes on without the count.
    pub fn start(pid: Option<u32>) -> anyhow::Result<Option<Counter>> {
        let Some(pid) = pid.filter(|_| ENABLED.load(Ordering::Relaxed)) else {
            return Ok(None);
        };
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting perf stat (is Linux's perf installed?)")?;
        Ok(Some(Counter { perf }))
    }

    /// Stops the count (perf prints its totals on SIGINT) and returns it.
    pub fn finish(self) -> anyhow::Result<u64> {
        let pid = i32::try_from(self.perf.id()).context("perf's pid")?;
        // SAFETY: signals a child this process started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let out = self.perf.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        parse(&text).with_context(|| format!("no syscall count in perf's output: {text}"))
    }
}

/// The count from `perf stat -x,` output: `COUNT,UNIT,EVENT,...`.
fn parse(text: &str) -> Option<u64> {
    text.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| {
            f.get(2)
                .is_some_and(|e| e.starts_with("raw_syscalls:sys_enter"))
        })
        .and_then(|f| f.first()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_the_count_from_perf_csv() {
        let out = "# started on Thu\n370129,,raw_syscalls:sys_enter,4944923793,100.00,,\n";
        assert_eq!(parse(out), Some(370129));
        // An event perf could not count, or no such line: no number.
        assert_eq!(
            parse("<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n"),
            None
        );
        assert_eq!(parse("Error: no permission\n"), None);
    }
}
