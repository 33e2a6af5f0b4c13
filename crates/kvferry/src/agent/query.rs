//! Querying storage without registering it (NIXL's `queryMem`): does a file
//! exist, and how large is it.

use super::Agent;
use crate::backend::FileInfo;
use crate::desc::RegDescList;
use crate::error::{Error, ErrorKind, Result};

impl Agent {
    /// Describes each storage descriptor of `list` (size, mode, mtime), or
    /// `None` where it does not exist. FILE and BLOCK descriptors in path mode
    /// (`meta_info = "r:/path"`) name a path; in fd mode `dev_id` is an open
    /// descriptor. The first backend, by preference rank, that knows the
    /// memory type answers.
    ///
    /// ```no_run
    /// use kvferry::{Agent, MemType, RegDesc, RegDescList};
    /// let a = Agent::with_backends("q", &["POSIX"])?;
    /// let l = RegDescList::from_descs(MemType::File, vec![RegDesc::with_meta(0, 0, 0, "r:/etc/hostname")]);
    /// let info = a.query_mem(&l)?;
    /// assert!(info[0].is_some());
    /// # Ok::<(), kvferry::Error>(())
    /// ```
    pub fn query_mem(&self, list: &RegDescList) -> Result<Vec<Option<FileInfo>>> {
        let mt = list.mem_type();
        let mut slots: Vec<_> = self.slots().into_iter().filter(|s| s.caps.mem_types.contains(&mt)).collect();
        slots.sort_by_key(|s| s.caps.rank);
        let mut last = None;
        for s in &slots {
            let answers: Result<Vec<_>> = list.iter().map(|d| s.backend.query_mem(mt, d)).collect();
            match answers {
                Err(e) if e.kind() == ErrorKind::NotSupported => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::not_supported(format!(
                "no backend of agent '{}' can query {mt} descriptors (backends: {:?}); create one that supports {mt}, such as POSIX for FILE and BLOCK",
                self.name(),
                self.backends()
            ))
        }))
    }
}
