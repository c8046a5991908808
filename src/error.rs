//! The one error type of the plugin, and the one place where an error gets its gRPC code.
//!
//! [`Error`] has two families of variants:
//! - **conditions** the plugin decided (`InvalidArgument` … `Internal`): a domain module saw
//!   what is wrong and says so, with what to do about it. Each condition is one gRPC code.
//! - **causes** seen where the plugin meets the outside, with their source and a [`Kind`]
//!   derived once, where they are seen: [`Error::Io`] (a system call: the errno),
//!   [`Error::Tool`] (a child process: exit status and stderr under `LC_ALL=C`, classified in
//!   `exec`), [`Error::Libvirt`] (libvirt's error code and domain, classified in
//!   `hypervisor::conn`).
//!
//! [`Error::code`] maps a condition, or a cause's kind, to the gRPC code; `From<Error> for
//! Status` uses it, and so does domain code that must tell cases apart (e.g. "the domain is
//! gone" is `code() == Code::NotFound`, whether the plugin or libvirt said so). Nothing else
//! decides a code, and nothing matches message text to find one.

use tonic::{Code, Status};

/// The plugin's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error of the plugin; [`Error::code`] is its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Condition: the request is malformed or names something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// Condition: the object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Condition: an object of that name exists with other properties.
    #[error("{0}")]
    AlreadyExists(String),
    /// Condition: the system is not in a state where the operation can run.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Condition: another operation on the same object is in flight.
    #[error("{0}")]
    Aborted(String),
    /// Condition: a size or count past what is possible.
    #[error("{0}")]
    OutOfRange(String),
    /// Condition: space, slots or another resource ran out.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Condition: a dependency (libvirtd, a daemon, a tool) is missing or down; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Condition: the operation started but could not be confirmed in time; retry.
    #[error("{0}")]
    Timeout(String),
    /// Condition: the plugin does not support this.
    #[error("{0}")]
    Unimplemented(String),
    /// Condition: a bug or an unexpected state.
    #[error("{0}")]
    Internal(String),
    /// Condition: a pool record file exists but cannot be read (not JSON, torn by a crash,
    /// another record's bytes); the message names the file and what to do (restore it, mend
    /// it, or what removing it gives up). The object it describes is there, so an RPC that
    /// names it (or, for a create, a name it may hold) answers neither NOT_FOUND (it exists)
    /// nor OK (a delete would forget a record and image that stay), and not INTERNAL (no
    /// bug: once the operator repairs the record the same request succeeds).
    /// FAILED_PRECONDITION, like an image that is missing or damaged: the pool is not in a
    /// state where the operation can run.
    #[error("{0}")]
    UnreadableRecord(String),
    /// Cause: a system call or file operation failed; its kind comes from the errno.
    #[error("{context}: {source}{}", io_advice(source))]
    Io {
        /// What was being done, e.g. `writing record x`.
        context: String,
        /// The failure (with its errno when the OS gave one).
        #[source]
        source: std::io::Error,
    },
    /// Cause: a child tool exited non-zero (or was killed).
    #[error("{program} failed ({}): {stderr}", exit_status(*.status))]
    Tool {
        /// The program, e.g. `mkfs.ext4`.
        program: String,
        /// Its exit code; None when a signal killed it.
        status: Option<i32>,
        /// What it said (stderr, or stdout when stderr was empty), trimmed; in the C locale.
        stderr: String,
        /// What the failure means, from the exit status and the C-locale stderr.
        kind: Kind,
    },
    /// Cause: a libvirt call failed.
    #[error("{}", libvirt_message(.op, .host, .uri, .message, *.kind))]
    Libvirt {
        /// What was being done, e.g. `attaching disk sdb`.
        op: String,
        /// The hypervisor host (`[[host]]` name) the connection reaches.
        host: String,
        /// The libvirt URI of the connection.
        uri: String,
        /// libvirt's error code (`virErrorNumber`).
        code: i32,
        /// libvirt's error domain (`virErrorDomain`): which part of libvirt failed.
        domain: i32,
        /// libvirt's message.
        message: String,
        /// What the failure means, from the code and domain.
        kind: Kind,
    },
}

/// What a cause (system call, tool, libvirt call) means for the plugin: derived once, where
/// the failure is seen, from an errno, an exit status or a libvirt error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A filesystem or quota is full (ENOSPC, EDQUOT). RESOURCE_EXHAUSTED.
    NoSpace,
    /// A file past the largest the filesystem or image format allows (EFBIG). OUT_OF_RANGE.
    TooLarge,
    /// A mount or device is in use (EBUSY). FAILED_PRECONDITION.
    Busy,
    /// Another process holds the image open (QEMU's image lock). FAILED_PRECONDITION.
    Locked,
    /// The kernel or a daemon refused the operation (EPERM, EACCES). INTERNAL: a domain
    /// module that knows why (e.g. a missing capability) says so as a condition.
    PermissionDenied,
    /// The named object (a libvirt domain) does not exist. NOT_FOUND.
    NotFound,
    /// The daemon (libvirtd) cannot be reached. UNAVAILABLE.
    Unreachable,
    /// The daemon gave up waiting. DEADLINE_EXCEEDED.
    Timeout,
    /// The object is in the wrong state for the operation (e.g. the domain is not running).
    /// FAILED_PRECONDITION.
    InvalidState,
    /// The domain has no free PCI slot for another virtio disk. RESOURCE_EXHAUSTED.
    NoPciSlot,
    /// A device removal the guest has yet to finish. ABORTED.
    UnplugPending,
    /// Anything else. INTERNAL.
    Other,
}

impl Kind {
    /// The kind of a system call's errno. A missing file (ENOENT) is `Other`: inside a pool
    /// it is a fault, not the CSI NOT_FOUND of a volume.
    pub fn from_errno(errno: i32) -> Kind {
        match errno {
            libc::ENOSPC | libc::EDQUOT => Kind::NoSpace,
            libc::EFBIG => Kind::TooLarge,
            libc::EBUSY => Kind::Busy,
            libc::EPERM | libc::EACCES => Kind::PermissionDenied,
            _ => Kind::Other,
        }
    }

    /// The kind of an I/O error: its errno, or else its `ErrorKind` (wrappers such as
    /// tempfile's keep the kind but not the errno).
    pub fn from_io(e: &std::io::Error) -> Kind {
        use std::io::ErrorKind as K;
        if let Some(errno) = e.raw_os_error() {
            return Kind::from_errno(errno);
        }
        match e.kind() {
            K::StorageFull | K::QuotaExceeded => Kind::NoSpace,
            K::FileTooLarge => Kind::TooLarge,
            K::ResourceBusy => Kind::Busy,
            K::PermissionDenied => Kind::PermissionDenied,
            _ => Kind::Other,
        }
    }

    /// The gRPC code of a cause of this kind: the table in the variants' docs.
    pub fn code(self) -> Code {
        match self {
            Kind::NoSpace | Kind::NoPciSlot => Code::ResourceExhausted,
            Kind::TooLarge => Code::OutOfRange,
            Kind::Busy | Kind::Locked | Kind::InvalidState => Code::FailedPrecondition,
            Kind::NotFound => Code::NotFound,
            Kind::Unreachable => Code::Unavailable,
            Kind::Timeout => Code::DeadlineExceeded,
            Kind::UnplugPending => Code::Aborted,
            Kind::PermissionDenied | Kind::Other => Code::Internal,
        }
    }
}

/// What to do about an I/O failure, where the plugin knows (appended to its message).
fn io_advice(e: &std::io::Error) -> &'static str {
    match Kind::from_io(e) {
        Kind::NoSpace => {
            "; the file system (or quota) is full: no free blocks or no free inodes (`df -h`, \
             `df -i`); free some (delete volumes or snapshots) or grow it"
        }
        _ => "",
    }
}

fn exit_status(status: Option<i32>) -> String {
    status.map_or_else(
        || "killed by a signal".to_string(),
        |c| format!("exit status {c}"),
    )
}

/// A libvirt error's message: what was done, libvirt's words, and what to do for the kinds
/// where the plugin knows.
fn libvirt_message(op: &str, host: &str, uri: &str, message: &str, kind: Kind) -> String {
    match kind {
        Kind::Unreachable => format!(
            "{op}: libvirt of host {host} at {uri} is unreachable ({message}); check that \
             libvirtd is running there and the URI is right (the host's uri, or --libvirt-uri)"
        ),
        Kind::NoPciSlot => format!(
            "{op}: the domain has no free PCI slot for another disk ({message}); detach a disk, \
             add pcie-root-port controllers to the domain, or use bus=scsi"
        ),
        _ => format!("{op}: {message}"),
    }
}

impl Error {
    /// Wraps an I/O error with what was being done, e.g. `Error::io("writing record x", e)`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A failed system call (nix), e.g. `Error::sys("unmounting /x", errno)`.
    pub fn sys(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::io(context, std::io::Error::from_raw_os_error(errno as i32))
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// An [`Error::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// The condition with gRPC code `code` and message `msg`: for a domain module that adds
    /// to an error's message while keeping its code.
    pub fn condition(code: Code, msg: impl Into<String>) -> Self {
        let msg = msg.into();
        match code {
            Code::InvalidArgument => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::Aborted => Error::Aborted(msg),
            Code::OutOfRange => Error::OutOfRange(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::Unavailable => Error::Unavailable(msg),
            Code::DeadlineExceeded => Error::Timeout(msg),
            Code::Unimplemented => Error::Unimplemented(msg),
            _ => Error::Internal(msg),
        }
    }

    /// The kind of a cause (`Io`, `Tool`, `Libvirt`); None for a condition.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Error::Io { source, .. } => Some(Kind::from_io(source)),
            Error::Tool { kind, .. } | Error::Libvirt { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether the cause is a limit of this process or machine (out of file descriptors,
    /// EMFILE/ENFILE, or memory, ENOMEM), which says nothing about the file it was opening.
    pub fn is_process_limit(&self) -> bool {
        matches!(self, Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)))
    }

    /// Whether the underlying cause is a full filesystem.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::ResourceExhausted(_)) || self.kind() == Some(Kind::NoSpace)
    }

    /// The gRPC code of this error: the one place it is decided.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Internal(_) => Code::Internal,
            Error::UnreadableRecord(_) => Code::FailedPrecondition,
            Error::Io { source, .. } => Kind::from_io(source).code(),
            Error::Tool { kind, .. } | Error::Libvirt { kind, .. } => kind.code(),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        if code == Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_filesystem_is_resource_exhausted_even_when_wrapped() {
        let raw = Error::io("writing", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(raw.code(), Code::ResourceExhausted);
        // tempfile and others wrap the OS error with a path: only the kind survives.
        let wrapped = std::io::Error::new(
            std::io::Error::from_raw_os_error(libc::ENOSPC).kind(),
            "No space left on device (os error 28) at path \"/pool/.tmp-x\"",
        );
        assert_eq!(
            Error::io("writing", wrapped).code(),
            Code::ResourceExhausted
        );
        assert!(raw.to_string().contains("df -i"), "{raw}");
        let other = Error::io("writing", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(other.code(), Code::Internal);
        assert!(!other.to_string().contains("df -i"), "{other}");
    }

    #[test]
    fn system_call_errnos_have_their_codes() {
        use nix::errno::Errno;
        let code = |e| Error::sys("x", e).code();
        assert_eq!(code(Errno::EBUSY), Code::FailedPrecondition);
        assert_eq!(code(Errno::EDQUOT), Code::ResourceExhausted);
        assert_eq!(code(Errno::EFBIG), Code::OutOfRange);
        assert_eq!(code(Errno::EPERM), Code::Internal);
        // A missing file inside a pool is a fault, never a volume's NOT_FOUND.
        assert_eq!(code(Errno::ENOENT), Code::Internal);
    }

    #[test]
    fn causes_keep_their_words_and_get_their_code_from_the_kind() {
        let tool = Error::Tool {
            program: "mkfs.ext4".into(),
            status: Some(1),
            stderr: "No space left on device while writing".into(),
            kind: Kind::NoSpace,
        };
        assert_eq!(tool.code(), Code::ResourceExhausted);
        assert_eq!(
            tool.to_string(),
            "mkfs.ext4 failed (exit status 1): No space left on device while writing"
        );
        let lv = Error::Libvirt {
            op: "pinging libvirt".into(),
            host: "hv2".into(),
            uri: "qemu:///system".into(),
            code: 38,
            domain: 7,
            message: "Cannot recv data".into(),
            kind: Kind::Unreachable,
        };
        assert_eq!(lv.code(), Code::Unavailable);
        assert!(
            lv.to_string()
                .contains("libvirt of host hv2 at qemu:///system is unreachable")
                && lv.to_string().contains("check that libvirtd is running"),
            "{lv}"
        );
        // A domain module that adds to the message keeps the code.
        let noted = Error::condition(lv.code(), format!("{lv}; and more"));
        assert_eq!(noted.code(), Code::Unavailable);
    }
}
