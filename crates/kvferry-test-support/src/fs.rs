//! Files and devices a test makes and always takes away again: temporary
//! directories, tmpfs mounts, loop devices; and the loud skip message for
//! tests that cannot run here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory created fresh (removed first if a crashed run left it) and
/// removed with everything in it on drop.
#[derive(Debug)]
pub struct TestDir(pub PathBuf);

impl TestDir {
    /// `base/<tag>-<pid>`, created.
    pub fn new_in(base: &Path, tag: &str) -> TestDir {
        let p = base.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TestDir(p)
    }

    /// A fresh directory in the system's temporary directory.
    pub fn temp(tag: &str) -> TestDir {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// The path of `f` inside the directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints a skip message nobody can miss (on stderr).
pub fn skipped(test: &str, why: &str) {
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
}

/// Whether this process runs as root (mounts, loop devices, namespaces,
/// dropping to another uid need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, returning its stdout (trimmed) or a reason.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{cmd} {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A loop device over an image file, detached on drop.
#[derive(Debug)]
pub struct LoopDev {
    /// The device path (`/dev/loopN`).
    pub dev: String,
}

impl LoopDev {
    /// Attaches `img` to a free loop device (root only).
    pub fn attach(img: &Path) -> Result<LoopDev, String> {
        let dev = sh("losetup", &["-f", "--show", img.to_str().unwrap()])?;
        Ok(LoopDev { dev })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Detach exactly this device, never others.
        let _ = sh("losetup", &["-d", &self.dev]);
    }
}

/// A tmpfs mounted at `dir`, unmounted on drop.
#[derive(Debug)]
pub struct Mount {
    /// The mount point.
    pub dir: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `size` (`"1m"`, `"64M"`) at `dir`, creating it (root only).
    pub fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        sh("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()])?;
        Ok(Mount { dir: dir.to_path_buf() })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = sh("umount", &[self.dir.to_str().unwrap()]);
    }
}
