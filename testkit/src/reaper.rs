//! Servers a test starts die with the test process. A control plane kept in a `static` is
//! never dropped, so without this its kube-apiserver and etcd outlived `cargo test`. Every
//! child registered here is killed when the process exits normally (the test harness always
//! does, failed tests included); one stopped earlier is unregistered, so no reused pid is hit.

use std::sync::{Mutex, Once};

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Data directories of servers kept in `static`s (never dropped): removed at exit, after
/// their servers are killed, so repeated test runs do not fill the disk.
static DIRS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

extern "C" fn reap() {
    // At exit, another thread may hold the lock mid-update: skip rather than deadlock.
    if let Ok(pids) = CHILDREN.try_lock() {
        for &pid in pids.iter() {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) with a pid this process spawned and has not waited for.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    if let Ok(dirs) = DIRS.try_lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain function with no captured state.
        unsafe {
            libc::atexit(reap);
        }
    });
}

/// Kills `pid` when this process exits, unless [`forget`] is called first.
pub fn reap_at_exit(pid: u32) {
    hook();
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

/// Removes `dir` when this process exits (after killing the children).
pub fn remove_at_exit(dir: &std::path::Path) {
    hook();
    DIRS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.to_path_buf());
}

/// `pid` was stopped and waited for: not ours to kill any more.
pub fn forget(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}
