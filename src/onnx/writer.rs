//! Graph construction helpers and the external-data sink for weights.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::proto::*;

/// Weights are streamed to one external-data file next to `model.onnx`, tensor by tensor, so an
/// import never holds the whole model in memory twice, and graph surgery later rewrites only the
/// small graph file.
pub struct ExternalData {
    file: BufWriter<File>,
    location: String,
    offset: u64,
}

/// Page-aligned offsets let ONNX Runtime memory-map the tensors instead of copying them.
const ALIGN: u64 = 4096;

impl ExternalData {
    pub fn create(path: &Path) -> anyhow::Result<ExternalData> {
        let file = File::create(path).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        let location = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        Ok(ExternalData { file: BufWriter::with_capacity(1 << 20, file), location, offset: 0 })
    }

    /// Append `data` and return the initializer that refers to it.
    pub fn add(&mut self, name: &str, dims: &[usize], data: &[f32]) -> anyhow::Result<TensorProto> {
        let padding = (ALIGN - self.offset % ALIGN) % ALIGN;
        self.file.write_all(&vec![0u8; padding as usize])?;
        self.offset += padding;
        let start = self.offset;
        for chunk in data.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.file.write_all(&bytes)?;
        }
        let length = data.len() as u64 * 4;
        self.offset += length;
        let entry = |key: &str, value: String| StringStringEntryProto { key: key.into(), value };
        Ok(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.into(),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", start.to_string()),
                entry("length", length.to_string()),
            ],
            data_location: DATA_LOCATION_EXTERNAL,
            ..Default::default()
        })
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        self.file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INT, i: value, ..Default::default() }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INTS, ints: values.to_vec(), ..Default::default() }
}

pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRING,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn attr_graph(name: &str, graph: GraphProto) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::GRAPH, g: Some(Box::new(graph)), ..Default::default() }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::FLOAT, f: value, ..Default::default() }
}

pub fn value_info(name: &str, elem_type: i32, dims: &[crate::model::Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                crate::model::Dim::Fixed(n) => DimensionValue::DimValue(*n as i64),
                crate::model::Dim::Symbolic(s) => DimensionValue::DimParam(s.clone()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor { elem_type, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

/// A float tensor of any shape (a graph input or output whose shape ONNX Runtime infers).
pub fn float_of_any_shape(name: &str) -> ValueInfoProto {
    of_any_shape(name, data_type::FLOAT)
}

/// A tensor of element type `elem_type` (a `data_type`) and any shape.
pub fn of_any_shape(name: &str, elem_type: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { tensor_type: Some(TypeProtoTensor { elem_type, shape: None }) }),
    }
}

/// Accumulates nodes and initializers; every method returns the name of the tensor it made.
pub struct Graph {
    pub proto: GraphProto,
    counter: usize,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph { proto: GraphProto { name: name.into(), ..Default::default() }, counter: 0 }
    }

    /// A fresh tensor name under `scope` (e.g. `blocks.3.attn`).
    pub fn fresh(&mut self, scope: &str, what: &str) -> String {
        self.counter += 1;
        format!("{scope}.{what}_{}", self.counter)
    }

    /// Add a node writing `output` (a chosen name, e.g. a hook).
    pub fn op_named(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> String {
        self.proto.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: format!("{op}:{output}"),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        output.to_string()
    }

    /// Add a node writing a fresh tensor in `scope`.
    pub fn op(&mut self, scope: &str, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(scope, &op.to_lowercase());
        self.op_named(op, inputs, &out, attrs)
    }

    /// A node with several outputs (e.g. Split).
    pub fn op_multi(
        &mut self,
        scope: &str,
        op: &str,
        inputs: &[&str],
        n_out: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outputs: Vec<String> = (0..n_out).map(|_| self.fresh(scope, &op.to_lowercase())).collect();
        self.proto.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: format!("{op}:{}", outputs[0]),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    pub fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        self.const_tensor(
            name,
            data_type::INT64,
            vec![values.len() as i64],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    pub fn scalar_i64(&mut self, name: &str, value: i64) -> String {
        self.const_tensor(name, data_type::INT64, vec![], value.to_le_bytes().to_vec())
    }

    pub fn scalar_f32(&mut self, name: &str, value: f32) -> String {
        self.const_tensor(name, data_type::FLOAT, vec![], value.to_le_bytes().to_vec())
    }

    fn const_tensor(&mut self, name: &str, data_type: i32, dims: Vec<i64>, raw_data: Vec<u8>) -> String {
        if !self.proto.initializer.iter().any(|t| t.name == name) {
            self.proto.initializer.push(TensorProto {
                dims,
                data_type,
                name: name.into(),
                raw_data,
                ..Default::default()
            });
        }
        name.to_string()
    }

    pub fn initializer(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name.clone();
        self.proto.initializer.push(tensor);
        name
    }
}
