//! The crate's error type: every failure names what was wrong (tensor, shape, limit, adapter).

use std::fmt;

/// Errors from the engine. None of them is a panic: bad input, a missing adapter or a
/// device that refuses a request all come back as one of these.
#[derive(Debug)]
pub enum Error {
    /// No adapter was found at all (or none for the requested backends).
    NoAdapter { backends: String, hint: &'static str },
    /// `WGPU_ADAPTER_NAME` (or an explicit name) matched none of the adapters found.
    AdapterNotFound { wanted: String, available: Vec<String> },
    /// The adapter refused to create a device.
    RequestDevice(String),
    /// A tensor's shape is not what an operation needs.
    Shape { what: String, expected: String, actual: String },
    /// A size exceeds a device limit.
    Limit { what: String, bytes: u64, limit: u64, limit_name: &'static str },
    /// An invalid argument (a zero stride, an empty tensor, a bad option).
    Invalid(String),
    /// A file could not be read or written.
    Io { path: String, source: std::io::Error },
    /// A file's contents are malformed or unsupported: names the file and what is wrong.
    Format { path: String, what: String },
    /// Reading a buffer back from the device failed.
    Readback(String),
    /// The device reported an error (validation, out of memory, device lost).
    Device(String),
    /// A collective between data-parallel ranks failed (a rank left, ranks disagree).
    Collective(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter { backends, hint } => {
                write!(f, "no GPU adapter found (backends: {backends}). {hint}")
            }
            Error::AdapterNotFound { wanted, available } => write!(
                f,
                "no adapter name contains {wanted:?}; adapters found: {}",
                if available.is_empty() { "none".to_string() } else { available.join(", ") }
            ),
            Error::RequestDevice(msg) => write!(f, "the adapter refused to create a device: {msg}"),
            Error::Shape { what, expected, actual } => {
                write!(f, "{what}: expected shape {expected}, got {actual}")
            }
            Error::Limit { what, bytes, limit, limit_name } => {
                write!(f, "{what} needs {bytes} bytes, above the adapter's {limit_name} of {limit} bytes")
            }
            Error::Invalid(msg) => f.write_str(msg),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Format { path, what } => write!(f, "{path}: {what}"),
            Error::Readback(msg) => {
                write!(f, "reading a buffer back from the device failed: {msg}")
            }
            Error::Device(msg) => write!(f, "device error: {msg}"),
            Error::Collective(msg) => write!(f, "data-parallel collective: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// Formats a shape as `[2, 3, 64, 96]`.
pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// An error for a tensor whose shape differs from the expected one; names both shapes.
pub fn shape_error(what: impl Into<String>, expected: &[usize], actual: &[usize]) -> Error {
    Error::Shape { what: what.into(), expected: fmt_shape(expected), actual: fmt_shape(actual) }
}

/// Checks `actual == expected`, or returns an error naming `what` and both shapes.
pub fn check_shape(what: &str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(shape_error(what, expected, actual))
    }
}
