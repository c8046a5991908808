//! The one error type of the plugin. Domain modules return it; the gRPC glue turns it into a
//! `tonic::Status` through the single `From` impl below.

use tonic::{Code, Status};

/// The plugin's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error of the plugin; [`Error::code`] is its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object of that name exists with other properties.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state where the operation can run.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in flight.
    #[error("{0}")]
    Aborted(String),
    /// A size or count past what is possible.
    #[error("{0}")]
    OutOfRange(String),
    /// Space, slots or another resource ran out.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (libvirtd, a daemon) is down; the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    /// The operation started but could not be confirmed in time; the caller should retry.
    #[error("{0}")]
    Timeout(String),
    /// The plugin does not support this.
    #[error("{0}")]
    Unimplemented(String),
    /// An I/O call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A bug or an unexpected failure.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what was being done, e.g. `Error::io("writing record x", e)`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// An [`Error::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// Whether the underlying cause is a full filesystem.
    pub fn is_no_space(&self) -> bool {
        match self {
            // By kind too: wrappers such as tempfile's keep the kind but not the errno.
            Error::Io { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
                    || source.raw_os_error() == Some(libc::EDQUOT)
                    || matches!(
                        source.kind(),
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                    )
            }
            Error::ResourceExhausted(_) => true,
            _ => false,
        }
    }

    /// The gRPC code of this error.
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
            Error::Io { .. } if self.is_no_space() => Code::ResourceExhausted,
            Error::Io { .. } | Error::Internal(_) => Code::Internal,
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
        let other = Error::io("writing", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(other.code(), Code::Internal);
    }
}
