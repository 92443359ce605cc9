//! Model weights: the native format is safetensors with the official state-dict names; the
//! released PyTorch checkpoints (`.pth`, legacy or zip) load directly. Names are
//! normalised as the official test script does: a `state_dict` wrapper is unwrapped, a
//! leading `model.` or `module.` is stripped, `loss.*` is ignored and
//! `num_batches_tracked` is optional.

use crate::error::{Error, Result};
use crate::formats::pth;
use crate::gpu::Gpu;
use crate::graph::Graph;
use crate::model::mmseg;
use std::collections::HashMap;
use std::path::Path;

/// One named tensor, f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads a `.safetensors` or `.pth` file (by extension), names normalised.
pub fn read(path: &Path) -> Result<Vec<NamedTensor>> {
    let shown = path.display().to_string();
    let tensors = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors(path)?,
        _ if pth::is_pytorch_file(path) => pth::read_pth(path)?,
        _ => return Err(Error::Format { path: shown, what: "expected a .safetensors or .pth file".into() }),
    };
    Ok(normalised(tensors))
}

/// Tensors as a checkpoint holds them, named as the model's ([`read`]'s rule).
pub fn normalised(tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
    tensors.into_iter().filter_map(normalise).collect()
}

/// Strips wrapper prefixes and drops what a model does not hold.
fn normalise(mut t: NamedTensor) -> Option<NamedTensor> {
    for prefix in ["model.", "module."] {
        if let Some(rest) = t.name.strip_prefix(prefix) {
            t.name = rest.to_string();
        }
    }
    // Training checkpoints also hold the optimizer's state, which a model does not.
    let skip = t.name.starts_with("loss.")
        || t.name.starts_with(OPTIMIZER_PREFIX)
        || t.name.ends_with(".num_batches_tracked");
    (!skip).then_some(t)
}

/// Names starting with this are optimizer state in a training checkpoint.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

fn read_safetensors(path: &Path) -> Result<Vec<NamedTensor>> {
    Ok(read_safetensors_raw(path)?.0)
}

/// A safetensors file as it is stored: tensors with their names unchanged, and the
/// header's string metadata.
pub fn read_safetensors_raw(path: &Path) -> Result<(Vec<NamedTensor>, HashMap<String, String>)> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    parse_safetensors(&bytes, &shown)
}

/// Weights from safetensors bytes already in memory (a model built into a program), names
/// normalised; `source` names them in errors.
pub fn from_safetensors_bytes(bytes: &[u8], source: &str) -> Result<Vec<NamedTensor>> {
    Ok(parse_safetensors(bytes, source)?.0.into_iter().filter_map(normalise).collect())
}

fn parse_safetensors(bytes: &[u8], shown: &str) -> Result<(Vec<NamedTensor>, HashMap<String, String>)> {
    let format = |what: String| Error::Format { path: shown.to_string(), what };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in file.iter() {
        // Element sizes are fixed per dtype here: the header's own sizes include sub-byte
        // types (F4), which a byte-chunking decoder must never see (found by fuzzing).
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => {
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            // Counters such as num_batches_tracked; kept so normalise() decides.
            safetensors::Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(format(format!("tensor {name} is {other:?}; only F32 weights are supported")))
            }
        };
        out.push(NamedTensor { name: name.to_string(), shape: view.shape().to_vec(), data });
    }
    // The header is a map: give its tensors in a fixed order (by name).
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, metadata))
}

/// Writes tensors as safetensors, atomically (a temporary file renamed over `path`).
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<()> {
    write_safetensors_with(path, tensors, None)
}

/// Writes tensors and string metadata as safetensors, atomically.
pub fn write_safetensors_with(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let shown = path.display().to_string();
    let views = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map(|v| (t.name.clone(), v))
            .map_err(|e| Error::Format { path: shown.clone(), what: format!("tensor {}: {e}", t.name) })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::Format { path: shown.clone(), what: e.to_string() })?;
    crate::fs::write_atomic(path, &bytes)
}

/// Loads `tensors` into the graph's parameters and running statistics. Every missing,
/// unexpected and mis-shaped key is reported, with the expected shape, in one error.
pub fn load_into(gpu: &Gpu, graph: &Graph, tensors: &[NamedTensor], source: &str) -> Result<()> {
    let expected = model_tensors(graph);
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match tensors.iter().find(|t| &t.name == name) {
            None => problems.push(format!("missing {name} {shape:?}")),
            Some(t) if &t.shape != shape => {
                problems.push(format!("{name}: shape {:?}, expected {shape:?}", t.shape))
            }
            Some(_) => {}
        }
    }
    for t in tensors {
        if !expected.iter().any(|(n, _)| n == &t.name) {
            problems.push(format!("unexpected {} {:?}", t.name, t.shape));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Format {
            path: source.to_string(),
            what: format!("{} key problem(s) against the model: {}", problems.len(), problems.join("; ")),
        });
    }
    for t in tensors {
        graph.set(gpu, &t.name, &t.data)?;
    }
    Ok(())
}

/// The names and shapes of a graph's parameters and running statistics.
fn model_tensors(graph: &Graph) -> Vec<(String, Vec<usize>)> {
    let buffer = |n: &str| (n.to_string(), graph.tensor(n).map(|t| t.shape().to_vec()).unwrap_or_default());
    graph.parameters().map(|(n, s)| (n.to_string(), s.to_vec())).chain(graph.buffers().map(buffer)).collect()
}

/// What [`load_pretrained`] did: the model's tensors it set, the file's tensors the model
/// has no place for, and the model's tensors the file does not hold (left as they were).
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainedReport {
    pub loaded: usize,
    pub skipped: Vec<String>,
    pub fresh: Vec<String>,
}

impl std::fmt::Display for PretrainedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let some = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
            let more =
                if names.len() > 4 { format!(", ... ({} more)", names.len() - 4) } else { String::new() };
            format!("{}{more}", shown.join(", "))
        };
        write!(
            f,
            "{} tensors loaded, {} in the file skipped ({}), {} of the model fresh ({})",
            self.loaded,
            self.skipped.len(),
            some(&self.skipped),
            self.fresh.len(),
            some(&self.fresh)
        )
    }
}

/// Loads a pretrained checkpoint (an ImageNet-pretrained HRNet classifier, or any model's
/// weights) as the official `init_weights` does: `last_layer` renamed `aux_head` (and a
/// `model.` prefix stripped, by [`read`]), then every tensor the model has by that name
/// set and the others skipped. An mmsegmentation checkpoint's names are mapped first
/// ([`mmseg::KEY_MAP`]); the model keeps its own convention. A tensor whose name the model
/// has with another shape is an error naming it (the official `load_state_dict` refuses it
/// too).
pub fn load_pretrained(
    gpu: &Gpu,
    graph: &Graph,
    tensors: &[NamedTensor],
    source: &str,
) -> Result<PretrainedReport> {
    let expected = model_tensors(graph);
    let mut report = PretrainedReport { loaded: 0, skipped: Vec::new(), fresh: Vec::new() };
    let mmseg = mmseg::is_mmsegmentation(tensors);
    let official = |t: &NamedTensor| match mmseg.then(|| mmseg::official_name(&t.name)).flatten() {
        Some(name) => name,
        None => t.name.replace("last_layer", "aux_head"),
    };
    let renamed: Vec<(String, &NamedTensor)> = tensors.iter().map(|t| (official(t), t)).collect();
    for (name, t) in &renamed {
        match expected.iter().find(|(n, _)| n == name) {
            None => report.skipped.push(t.name.clone()),
            Some((_, shape)) if shape != &t.shape => {
                return Err(Error::Shape {
                    what: format!("{source}: {} (as {name})", t.name),
                    expected: format!("{shape:?}"),
                    actual: format!("{:?}", t.shape),
                })
            }
            Some(_) => {
                graph.set(gpu, name, &t.data)?;
                report.loaded += 1;
            }
        }
    }
    report.fresh =
        expected.into_iter().map(|(n, _)| n).filter(|n| !renamed.iter().any(|(r, _)| r == n)).collect();
    Ok(report)
}

/// Reads the graph's parameters and running statistics back, with their official names.
pub fn state_dict(gpu: &Gpu, graph: &Graph) -> Result<Vec<NamedTensor>> {
    let names: Vec<String> =
        graph.parameters().map(|(n, _)| n.to_string()).chain(graph.buffers().map(str::to_string)).collect();
    names
        .into_iter()
        .map(|name| {
            let t = graph.tensor(&name)?;
            Ok(NamedTensor { shape: t.shape().to_vec(), data: t.to_vec(gpu)?, name })
        })
        .collect()
}
