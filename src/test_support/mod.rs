//! Support for tests, benchmarks and fuzz targets, outside the library's public surface: compiled
//! only for the crate's own unit tests or with the `test-support` feature (which the integration
//! tests enable through the self dev-dependency in Cargo.toml).

pub mod gguf_writer;
pub mod synth;
