//! The intermediate representations between the compiler's stages, apart from the stages that
//! build them: [`experiment`] (check's output, plan's input; [`path`] its path-patching part)
//! and [`plan`] (plan's output, the engine's only input).

pub mod experiment;
pub mod path;
pub mod plan;
