//! The backend-tracking agent wrapper of the seed `004_…` (dynamo's
//! `NixlAgent`), on kvferry's own API, where it needs no wrapper: an agent
//! knows which backends it created, requiring one gives an error that lists
//! what exists, and backends come from the environment with custom
//! parameters (the part the seed could not do on nixl_sys).
//!
//! `KVFERRY_BACKENDS=tcp,posix KVFERRY_TCP_LANES=4 cargo run -p kvferry --example backends_wrapper`
//! Without `KVFERRY_BACKENDS` it sets `tcp,posix` and `KVFERRY_TCP_LANES=4` itself.

use kvferry::{Agent, Params};

fn main() -> kvferry::Result<()> {
    // 1. All or nothing, like the seed's `with_backends`: the error names each failure.
    let strict = Agent::with_backends("strict", &["TCP", "POSIX"])?;
    println!("with_backends: {:?}", strict.backends());
    match Agent::with_backends("bad", &["TCP", "GDS"]) {
        Ok(_) => println!("with_backends(TCP, GDS): created (this build has GDS)"),
        Err(e) => println!("with_backends(TCP, GDS) fails: {e}"),
    }

    // 2. has_backend / require_backend: a clear error listing what exists.
    println!("has_backend(posix) = {}, has_backend(shm) = {}", strict.has_backend("posix"), strict.has_backend("shm"));
    if let Err(e) = strict.require_backend("SHM") {
        println!("require_backend(SHM): {e}");
    }

    // 3. Custom parameters, in code...
    let custom = Agent::with_backends("custom", &[])?;
    let mut tcp = Params::new();
    tcp.set("lanes", 4);
    custom.create_backend("TCP", &tcp)?;
    println!("custom TCP lanes = {:?}", custom.backend_params("TCP")?.iter().find(|(k, _)| *k == "lanes"));

    // ...and from the environment: KVFERRY_BACKENDS and KVFERRY_<B>_<P>.
    if std::env::var_os("KVFERRY_BACKENDS").is_none() {
        // Set before this program starts any thread of its own.
        std::env::set_var("KVFERRY_BACKENDS", "tcp,posix");
        std::env::set_var("KVFERRY_TCP_LANES", "4");
    }
    let env = Agent::from_env("from-env")?;
    println!("from_env backends: {:?}", env.backends());
    for b in env.backends() {
        let p: Vec<String> = env.backend_params(&b)?.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {b}: {}", p.join(" "));
    }
    env.require_backend("TCP")?;
    Ok(())
}
