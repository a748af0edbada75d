//! Runtime errors that tell a person how to fix them.
//!
//! Language errors (a `.bay` file that does not check) are miette diagnostics, in [`crate::diag`].
//! Everything else is an [`anyhow::Error`]; when the person reading it can act on it, it is a
//! [`Fixable`]: what went wrong, and how to fix it. It renders as
//!
//! ```text
//! <message>
//!   help: <help>
//! ```
//!
//! Build one with [`fixable!`](crate::fixable), which returns an [`anyhow::Error`], or return one
//! early with [`bail_fixable!`](crate::bail_fixable). Both take the message's format string and
//! arguments, a `;`, then `help:` and the help's format string and arguments, each as in
//! [`format!`] (inline captures such as `{e}` included; named arguments such as `x = 1` are
//! not accepted, use an inline capture instead):
//!
//! ```
//! use std::path::Path;
//! use patchbay::{bail_fixable, fixable};
//!
//! fn read_manifest(dir: &Path) -> anyhow::Result<String> {
//!     if !dir.is_dir() {
//!         bail_fixable!("no model directory at {}", dir.display(); help: "run `patchbay demo`");
//!     }
//!     let path = dir.join("manifest.json");
//!     std::fs::read_to_string(&path).map_err(|e| {
//!         fixable!(
//!             "cannot read {}: {e}", path.display();
//!             help: "is {} a model directory made by `patchbay import`?", dir.display()
//!         )
//!     })
//! }
//!
//! let err = read_manifest(Path::new("/no/such/model")).unwrap_err();
//! assert_eq!(err.to_string(), "no model directory at /no/such/model\n  help: run `patchbay demo`");
//! // The help stays reachable for whoever wants to print it apart from the message.
//! let fixable = err.downcast_ref::<patchbay::error::Fixable>().unwrap();
//! assert_eq!(fixable.help, "run `patchbay demo`");
//! ```

/// A runtime error a person can act on: what went wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}\n  help: {help}")]
pub struct Fixable {
    /// What went wrong.
    pub message: String,
    /// How to fix it.
    pub help: String,
}

impl Fixable {
    pub fn new(message: impl Into<String>, help: impl Into<String>) -> Fixable {
        Fixable { message: message.into(), help: help.into() }
    }

    /// The error as an [`anyhow::Error`]; [`anyhow::Error::downcast_ref`] gives the `Fixable` back.
    pub fn into_error(self) -> anyhow::Error {
        anyhow::Error::new(self)
    }
}

/// A [`Fixable`] error as an [`anyhow::Error`]:
/// `fixable!("message {}", arg; help: "help {}", arg)`. See [the module](crate::error).
#[macro_export]
macro_rules! fixable {
    ($message:literal $(, $arg:expr)* $(,)?; help: $help:literal $(, $help_arg:expr)* $(,)?) => {
        $crate::error::Fixable::new(
            ::std::format!($message $(, $arg)*),
            ::std::format!($help $(, $help_arg)*),
        )
        .into_error()
    };
}

/// Return early with a [`Fixable`] error: `return Err(fixable!(...))`, as [`anyhow::bail!`] is
/// to [`anyhow::anyhow!`]. Same arguments as [`fixable!`](crate::fixable).
#[macro_export]
macro_rules! bail_fixable {
    ($($input:tt)+) => {
        return ::std::result::Result::Err($crate::fixable!($($input)+))
    };
}
