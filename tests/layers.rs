//! The library's layers, each using only those before it (`src/lib.rs`): checked in the
//! sources rather than remembered. Unit tests (after a file's `#[cfg(test)]`) may reach
//! further.

use std::path::{Path, PathBuf};

/// The layers in order, each with its files under `src/`.
const LAYERS: &[(&str, &[&str])] = &[
    ("gpu", &["gpu"]),
    ("tensor", &["tensor.rs"]),
    ("dist", &["dist"]),
    ("kernels", &["kernels"]),
    ("graph", &["graph"]),
    ("model", &["model"]),
];

/// Everything the library has above the core layers: none of the core layers may use them.
const APPLICATIONS: &[&str] = &["infer", "train", "eval", "bench", "images"];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap()
        .flat_map(|e| rust_files(&e.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    files
}

#[test]
fn each_layer_uses_only_the_layers_before_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (i, (layer, paths)) in LAYERS.iter().enumerate() {
        let later = LAYERS[i + 1..].iter().map(|l| l.0).chain(APPLICATIONS.iter().copied());
        let forbidden: Vec<String> = later.map(|l| format!("crate::{l}")).collect();
        for file in paths.iter().flat_map(|p| rust_files(&src.join(p))) {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for (n, line) in code.lines().enumerate() {
                let code_part = line.split("//").next().unwrap();
                for f in forbidden.iter().filter(|f| code_part.contains(f.as_str())) {
                    violations.push(format!("{}:{}: the {layer} layer uses {f}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
