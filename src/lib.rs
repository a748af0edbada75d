//! patchbay: a compiler and runner for declarative activation-patching experiments.
//!
//! Stages, one module each: [`syntax`] (pest grammar -> AST with spans), [`check`] (names,
//! ranges and tokenisation resolved against the model; miette diagnostics), [`plan`] (datasets,
//! sweeps and targets expanded into an execution plan). Beside them: [`import`] (checkpoints ->
//! model directory), [`onnx`] (graph building and surgery), [`runtime`] (ONNX Runtime),
//! [`model`] (the model-directory contract and a pure-Rust reference forward pass).

pub mod cache;
pub mod check;
pub mod demo;
pub mod diag;
pub mod error;
pub mod fetch;
pub mod import;
pub mod ir;
pub mod model;
pub mod onnx;
pub mod plan;
pub mod predict;
pub mod report;
pub mod run;
pub mod runtime;
pub mod syntax;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
