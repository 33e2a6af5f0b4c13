//! How storage messages name their caller and the caller's entries: one
//! vocabulary for the checks in `plan.rs` and the O_DIRECT rules in
//! `align.rs`, so both word their errors the same way for each caller.

/// How a plan's messages name its caller and the caller's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Naming {
    /// Who checks: the start of every message.
    pub(crate) who: &'static str,
    /// What one entry is called (a request's "segment", a frame's "entry").
    pub(crate) item: &'static str,
}

impl Naming {
    /// The POSIX backend: the segments of a request.
    pub(crate) const POSIX: Naming = Naming { who: "POSIX", item: "segment" };
    /// A network backend serving exported files: the entries of a frame.
    pub(crate) const SERVED: Naming = Naming { who: "exported files", item: "entry" };
}
