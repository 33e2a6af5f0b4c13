//! The one error type of kvferry.
//!
//! [`ErrorKind`] mirrors NIXL's status taxonomy so that the Python layer can
//! map every error to the `nixl` status a caller expects. The message says
//! what went wrong, what was expected against what was received, and what to
//! do about it. Messages are written at the place the error is detected, where
//! that knowledge is.

use std::fmt;
use std::io;

/// What kind of failure an [`Error`] is, mirroring NIXL's status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed an argument that cannot be right (API misuse).
    InvalidParam,
    /// A backend failed while doing its job (an OS error, a lost byte).
    Backend,
    /// A named thing (agent, backend, region, file, key) is not known.
    NotFound,
    /// Two things that must agree do not (lengths, counts, memory types).
    Mismatch,
    /// The operation is refused by an access rule (unregistered memory, bad key, auth).
    NotAllowed,
    /// A request was posted again while it is still in flight.
    RepostActive,
    /// The operation is valid in general but not supported by this backend or build.
    NotSupported,
    /// The peer went away (connection reset, process exited) or never answered.
    RemoteDisconnect,
    /// The request was cancelled by its owner.
    Canceled,
    /// A bounded wait ran out before the operation finished.
    Timeout,
    /// Bytes from a peer (metadata, frames, serialized lists) do not decode.
    Malformed,
    /// A broken internal invariant: please file a bug with the message.
    Internal,
}

impl ErrorKind {
    /// The NIXL status name this kind corresponds to (`NIXL_ERR_*`).
    pub fn nixl_status(self) -> &'static str {
        match self {
            ErrorKind::InvalidParam | ErrorKind::Malformed => "NIXL_ERR_INVALID_PARAM",
            ErrorKind::Backend => "NIXL_ERR_BACKEND",
            ErrorKind::NotFound => "NIXL_ERR_NOT_FOUND",
            ErrorKind::Mismatch => "NIXL_ERR_MISMATCH",
            ErrorKind::NotAllowed => "NIXL_ERR_NOT_ALLOWED",
            ErrorKind::RepostActive => "NIXL_ERR_REPOST_ACTIVE",
            ErrorKind::NotSupported => "NIXL_ERR_NOT_SUPPORTED",
            ErrorKind::RemoteDisconnect => "NIXL_ERR_REMOTE_DISCONNECT",
            ErrorKind::Canceled => "NIXL_ERR_CANCELED",
            ErrorKind::Timeout => "NIXL_ERR_TIMEOUT",
            ErrorKind::Internal => "NIXL_ERR_UNKNOWN",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::InvalidParam => "invalid parameter",
            ErrorKind::Backend => "backend error",
            ErrorKind::NotFound => "not found",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::NotAllowed => "not allowed",
            ErrorKind::RepostActive => "request still active",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::RemoteDisconnect => "remote disconnected",
            ErrorKind::Canceled => "canceled",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Malformed => "malformed input",
            ErrorKind::Internal => "internal error (please file a bug)",
        };
        f.write_str(s)
    }
}

/// The error type of every fallible kvferry operation.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// `Result` with kvferry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message that says what went wrong and what to do.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// Attaches the OS error that caused this one.
    pub fn with_source(mut self, source: io::Error) -> Self {
        self.source = Some(source);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The OS error behind this one, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }

    /// Adds context in front of the message, keeping kind and source.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// Shorthand for [`ErrorKind::InvalidParam`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParam, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Mismatch`].
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, message)
    }

    /// Shorthand for [`ErrorKind::NotAllowed`].
    pub fn not_allowed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotAllowed, message)
    }

    /// Shorthand for [`ErrorKind::NotSupported`].
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, message)
    }

    /// Shorthand for [`ErrorKind::Malformed`].
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, message)
    }

    /// Shorthand for [`ErrorKind::RemoteDisconnect`].
    pub fn disconnected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::RemoteDisconnect, message)
    }

    /// Shorthand for [`ErrorKind::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// A backend error caused by an OS error, with `what` saying what was attempted.
    pub fn io(what: impl fmt::Display, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected => ErrorKind::RemoteDisconnect,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::NotAllowed,
            _ => ErrorKind::Backend,
        };
        Error { kind, message: format!("{what}: {err}"), source: Some(err) }
    }

    /// An internal invariant broke; the message should say which.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl Clone for Error {
    fn clone(&self) -> Self {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            source: self.source.as_ref().map(|e| match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            }),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl PartialEq<ErrorKind> for Error {
    fn eq(&self, other: &ErrorKind) -> bool {
        self.kind == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds() {
        let e = Error::io("connect to 127.0.0.1:1", io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(e.kind(), ErrorKind::RemoteDisconnect);
        assert!(e.to_string().contains("127.0.0.1:1"));
        let e = Error::io("open /x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert_eq!(e.clone().io_error().and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
    }

    #[test]
    fn context_keeps_kind() {
        let e = Error::not_found("agent 'b' is not loaded").context("create_request");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.message(), "create_request: agent 'b' is not loaded");
        assert_eq!(e.kind().nixl_status(), "NIXL_ERR_NOT_FOUND");
    }
}
