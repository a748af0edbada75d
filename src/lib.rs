//! patchbay: a compiler and runner for declarative activation-patching experiments.
//!
//! Stages, one module each, each depending only on those before it: [`syntax`] (pest grammar ->
//! AST with spans), [`check`] (names, ranges and tokenisation resolved against the model; miette
//! diagnostics), [`plan`] (datasets, sweeps and targets expanded into an execution plan),
//! [`run`] (the plan executed through ONNX Runtime), [`report`] (CSVs, provenance, summary), and
//! [`cluster`] (scheduler jobs running a plan in shards). The
//! IRs between them live in [`ir`]. Below them: [`model`] (the model-directory contract and a
//! pure-Rust reference forward pass), [`onnx`] (graph building and surgery), [`runtime`] (ONNX
//! Runtime), [`import`] (checkpoints -> model directory), and the leaves [`diag`], [`error`],
//! [`cache`], [`files`]. `tests/layering.rs` holds the order.

pub mod cache;
pub mod check;
pub mod cluster;
pub mod demo;
pub mod diag;
pub mod error;
pub mod fetch;
pub mod files;
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
