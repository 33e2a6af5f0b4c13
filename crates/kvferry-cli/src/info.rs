//! `kvferry info`: a setup check. Says what works on this machine and, for
//! every "no", what to do about it.

use std::process::{Command, Stdio};
use std::time::Duration;

use kvferry::metadata::store::{EtcdStore, MetaStore};
use kvferry::Agent;
use serde::Serialize;

/// One line of the check.
#[derive(Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(what: &str, r: Result<String, (String, String)>) -> Check {
    match r {
        Ok(detail) => Check { what: what.into(), ok: true, detail, hint: None },
        Err((detail, hint)) => Check { what: what.into(), ok: false, detail, hint: Some(hint) },
    }
}

/// The POSIX backend's own io_uring probe (the one `engine=auto` trusts).
fn io_uring() -> Result<String, (String, String)> {
    match kvferry::backend::posix::probe_io_uring() {
        Ok(()) => Ok("a ring runs a NOP and has READ, WRITE and POLL_ADD (POSIX engine=auto uses it)".into()),
        Err(e) => {
            Err((e.message().to_string(), "POSIX falls back to its thread pool (engine=threads) by itself".into()))
        }
    }
}

/// The SHM plugin's probe: cross-memory attach works and Yama allows it.
fn cma() -> Result<String, (String, String)> {
    let scope = kvferry::backend::shm::ptrace_scope().map_or_else(|| "n/a".to_string(), |s| s.to_string());
    match kvferry::backend::plugin("SHM").and_then(|p| p.probe()) {
        Ok(()) => Ok(format!("process_vm_readv works (yama ptrace_scope {scope})")),
        Err(e) => Err((
            format!("{} (yama ptrace_scope {scope})", e.message()),
            "allow ptrace between the processes (ptrace_scope 0 or 1, or CAP_SYS_PTRACE); SHM is skipped and TCP carries same-host traffic".into(),
        )),
    }
}

fn netns() -> Result<String, (String, String)> {
    let st = Command::new("unshare").args(["--net", "true"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    match st {
        Ok(s) if s.success() => Ok("unshare --net works (multi-host tests can run)".into()),
        Ok(s) => Err((
            format!("unshare --net exited with {s}"),
            "run as root (or with CAP_SYS_ADMIN) to create network namespaces".into(),
        )),
        Err(e) => Err((format!("unshare not runnable: {e}"), "apt-get install util-linux iproute2".into())),
    }
}

/// The library's own CUDA probe (the one VRAM registration uses): driver
/// version, devices and cuFile, loaded at run time.
fn gpu() -> Result<String, (String, String)> {
    let st = kvferry::cuda_status();
    if st.devices.is_empty() {
        return Err((
            st.driver_error.unwrap_or_else(|| "the CUDA driver reports no device".into()),
            "VRAM needs an NVIDIA GPU with its driver (libcuda.so.1); DRAM, FILE and BLOCK work without".into(),
        ));
    }
    let devs: Vec<String> =
        st.devices.iter().map(|d| format!("{}: {} ({} MiB)", d.ordinal, d.name, d.total_mem >> 20)).collect();
    let gds = if st.cufile {
        "cuFile driver opens".to_string()
    } else {
        format!("no GDS: {}", st.cufile_error.unwrap_or_default())
    };
    Ok(format!(
        "CUDA driver {}, devices [{}]; {gds}; VRAM registration checks pointer attributes",
        st.driver_version.map_or_else(|| "?".into(), |v| format!("{}.{}", v / 1000, v % 1000 / 10)),
        devs.join(", ")
    ))
}

/// Asks each configured etcd endpoint for its revision, with the client
/// agents use (etcd's JSON API), as the configured user if any.
fn etcd() -> Result<String, (String, String)> {
    let cfg = kvferry::AgentConfig::env_defaults();
    if cfg.etcd_endpoints.is_empty() {
        return Err((
            "no etcd endpoints configured".into(),
            "set KVFERRY_ETCD_ENDPOINTS=http://host:2379 to use etcd for metadata".into(),
        ));
    }
    let (mut good, mut bad, mut refused) = (Vec::new(), Vec::new(), false);
    for ep in &cfg.etcd_endpoints {
        let answer = EtcdStore::connect(std::slice::from_ref(ep), Duration::from_secs(1))
            .map(|s| s.with_credentials(cfg.etcd_credentials.clone()))
            .and_then(|s| s.revision());
        match answer {
            Ok(rev) => good.push(format!("{ep} (revision {rev})")),
            Err(e) => {
                refused |= e.kind() == kvferry::ErrorKind::NotAllowed;
                bad.push(e.message().to_string());
            }
        }
    }
    if bad.is_empty() {
        Ok(format!("answers: {}", good.join(", ")))
    } else {
        let hint = match refused {
            true => "set KVFERRY_ETCD_USER and KVFERRY_ETCD_PASSWORD to a user etcd accepts",
            false => "start etcd (v3.4 or later) there, or fix KVFERRY_ETCD_ENDPOINTS",
        };
        Err((bad.join("; "), hint.into()))
    }
}

/// Runs every check.
pub fn checks() -> Vec<Check> {
    let mut v = Vec::new();
    for p in kvferry::backend::plugins() {
        let mems: Vec<&str> = p.mem_types().iter().map(|m| m.as_str()).collect();
        let params: Vec<String> = p.params().iter().map(|s| format!("{}={}", s.name, s.default)).collect();
        let detail = format!("mem [{}] params [{}]", mems.join(","), params.join(" "));
        v.push(match p.probe() {
            Ok(()) => check(&format!("plugin {}", p.name()), Ok(detail)),
            Err(e) => check(
                &format!("plugin {}", p.name()),
                Err((format!("{detail}: {e}"), "see the message; other backends still work".into())),
            ),
        });
    }
    v.push(check("io_uring", io_uring()));
    v.push(check("cross-memory attach", cma()));
    v.push(check("network namespaces", netns()));
    v.push(check("GPU", gpu()));
    v.push(check("etcd", etcd()));
    v
}

/// `kvferry info`.
pub fn run(json: bool) {
    let checks = checks();
    if json {
        let out = serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "plugins": Agent::available_plugins(), "checks": checks });
        println!("{out}");
        return;
    }
    println!("kvferry {}", env!("CARGO_PKG_VERSION"));
    for c in &checks {
        println!("[{}] {:<22} {}", if c.ok { "yes" } else { "no " }, c.what, c.detail);
        if let Some(h) = &c.hint {
            println!("      hint: {h}");
        }
    }
}
