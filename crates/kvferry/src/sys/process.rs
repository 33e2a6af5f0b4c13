//! Process attributes: who we are, who may attach to us, how many
//! descriptors we may hold.

use std::io;

/// This process's effective uid.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Lets any process of the same user attach to this one
/// (`prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`), which Yama's
/// `ptrace_scope` 1 requires for cross-memory attach from a non-ancestor.
pub(crate) fn allow_any_ptracer() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PTRACER) takes integer arguments only and changes process attributes.
    syscall!(unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) }).map(drop)
}

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) towards
/// `want`, up to the hard limit, and returns the soft limit now in force.
/// Never lowers it.
pub(crate) fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, owned `lim`.
    syscall!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < want {
        let raised = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one valid rlimit; it raises the soft limit at most to the hard one.
        if syscall!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }).is_ok() {
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_only_rise() {
        let now = raise_fd_limit(0).unwrap();
        assert!(now > 0);
        assert!(raise_fd_limit(now + 1).unwrap() >= now);
        let _ = effective_uid();
    }
}
