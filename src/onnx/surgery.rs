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

/// The float initializer `name` of the model in `dir`, read from its external data file;
/// `None` when the graph has no such float initializer stored externally.
pub fn external_initializer(
    dir: &Path,
    model: &ModelProto,
    name: &str,
) -> anyhow::Result<Option<(Vec<usize>, Vec<f32>)>> {
    use std::io::{Read as _, Seek as _};
    let graph = model.graph.as_ref().ok_or_else(|| anyhow::anyhow!("ONNX model has no graph"))?;
    let Some(t) = graph.initializer.iter().find(|t| t.name == name) else { return Ok(None) };
    let entry = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
    let (Some(location), true) = (entry("location"), t.data_type == super::proto::data_type::FLOAT) else {
        return Ok(None);
    };
    let number = |key: &str| entry(key).map_or(Ok(0), |v| v.parse::<u64>());
    let (offset, length) = (number("offset")?, number("length")?);
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let count: usize = shape.iter().product();
    if length != 4 * count as u64 {
        anyhow::bail!("initializer `{name}`: {length} bytes of external data for {count} floats");
    }
    let path = dir.join(location);
    let mut file = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut bytes = vec![0u8; length as usize];
    file.seek(std::io::SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot read `{name}` from {}: {e}", path.display()))?;
    let data = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Some((shape, data)))
}
