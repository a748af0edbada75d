//! Graph surgery on a model directory's `model.onnx`: specialised graphs are built in memory
//! and share the directory's external weights.

use std::path::Path;

use prost::Message as _;

use super::proto::ModelProto;

pub fn load(path: &Path) -> anyhow::Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{} is not a valid ONNX model: {e}", path.display()))
}

/// Expose existing tensors (e.g. hooks) as extra graph outputs, so one run captures them.
pub fn with_outputs(mut model: ModelProto, names: &[&str]) -> anyhow::Result<ModelProto> {
    let graph = model.graph.as_mut().ok_or_else(|| anyhow::anyhow!("ONNX model has no graph"))?;
    for &name in names {
        if graph.output.iter().any(|o| o.name == name) {
            continue;
        }
        let info = graph
            .value_info
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the graph has no tensor named `{name}`"))?;
        graph.output.push(info);
    }
    Ok(model)
}
