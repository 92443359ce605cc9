//! Every shader validates with naga, without a GPU; errors name the file and line.

use hrnet_ocr::gpu::Shader;
use std::path::Path;

/// Every registered shader and f16 variant, composed as the engine builds it (the kernel
/// file with the pieces it includes), parses and validates; errors name the shader and the
/// line of the composed source.
#[test]
fn every_composed_shader_validates_with_naga() {
    let mut errors = Vec::new();
    for shader in Shader::ALL {
        let name = shader.name();
        let source = shader.source().unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{name} (shaders/{}.wgsl composed)", shader.file().0);
        let module = match naga::front::wgsl::parse_str(&source) {
            Ok(m) => m,
            Err(e) => {
                errors.push(e.emit_to_string_with_path(&source, &shown));
                continue;
            }
        };
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        if let Err(e) = validator.validate(&module) {
            errors.push(e.emit_to_string_with_path(&source, &shown));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Each shared piece is included by a kernel file (none is dead), and composing a file
/// leaves no directive behind.
#[test]
fn every_include_is_used_and_composed() {
    for (piece, _) in hrnet_ocr::gpu::INCLUDES {
        let directive = format!("#include \"{piece}\"");
        assert!(
            Shader::ALL.iter().any(|s| s.file().1.contains(&directive)),
            "shaders/include/{piece} is included by no kernel file"
        );
    }
    for shader in Shader::ALL {
        let source = shader.source().unwrap();
        assert!(
            !source.lines().any(|l| l.trim_start().starts_with('#')) && !source.contains("${"),
            "{}: a directive or substitution survived composition",
            shader.name()
        );
    }
}

#[test]
fn every_shader_file_is_registered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "wgsl").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    on_disk.sort();
    let mut registered: Vec<String> = Shader::ALL.iter().map(|s| s.file().0.to_string()).collect();
    registered.sort();
    registered.dedup();
    assert_eq!(on_disk, registered, "shaders/ and the registry in src/gpu/registry.rs differ");
}

/// Runs a naga back end, turning its error or its panic (some back ends panic on input
/// they do not support) into a message.
fn guarded<E: std::fmt::Display>(write: impl FnOnce() -> Result<(), E>) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(write)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => Err(format!(
            "the back end panicked: {}",
            panic.downcast_ref::<String>().map_or("(no message)", String::as_str)
        )),
    }
}

/// Every compute entry point of every registered shader and f16 variant, with the override
/// constants the engine's pipelines set, translates to MSL (Metal), HLSL (DX12), SPIR-V
/// (Vulkan) and, except the f16 variants, GLSL ES 3.1 (GL): a kernel another backend would
/// reject fails here, on any machine.
#[test]
fn every_entry_point_translates_for_every_backend() {
    use naga::back::{glsl, hlsl, msl, spv};
    let mut constants = naga::back::PipelineConstants::default();
    for (name, value) in hrnet_ocr::kernels::pipeline_constants(hrnet_ocr::gpu::DEFAULT_WORKGROUP_SIZE) {
        constants.insert(name.to_string(), value);
    }

    let (mut errors, mut translated) = (Vec::new(), 0);
    for variant in Shader::ALL {
        let shader = variant.name();
        let source = variant.source().unwrap_or_else(|e| panic!("{e}"));
        let f16 = variant.needs_f16();
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{shader}: {e}"));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{shader}: {e}"));
        // The tiled convolution's deeper slice (the most of its workgroup arrays it uses),
        // where the shader declares it.
        let mut constants = constants.clone();
        if module.overrides.iter().any(|(_, o)| o.name.as_deref() == Some("SLICE")) {
            constants.insert("SLICE".to_string(), 16.0);
        }
        for entry in &module.entry_points {
            let stage = entry.stage;
            let ep = entry.name.clone();
            let mut fail =
                |backend: &str, e: String| errors.push(format!("{shader}.wgsl {ep} ({backend}): {e}"));
            let (module, info) = match naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((stage, ep.as_str())),
                &constants,
            ) {
                Ok(done) => done,
                Err(e) => {
                    fail("override constants", e.to_string());
                    continue;
                }
            };
            let msl_pipeline =
                msl::PipelineOptions { entry_point: Some((stage, ep.clone())), ..Default::default() };
            if let Err(e) = guarded(|| {
                msl::write_string(&module, &info, &msl::Options::default(), &msl_pipeline).map(|_| ())
            }) {
                fail("MSL", e);
            }
            // DX12 offers SHADER_F16 from shader model 6.2 on.
            let shader_model = if f16 { hlsl::ShaderModel::V6_2 } else { hlsl::ShaderModel::V6_0 };
            let hlsl_options = hlsl::Options { shader_model, ..Default::default() };
            let hlsl_pipeline = hlsl::PipelineOptions { entry_point: Some((stage, ep.clone())) };
            let mut text = String::new();
            if let Err(e) =
                hlsl::Writer::new(&mut text, &hlsl_options, &hlsl_pipeline).write(&module, &info, None)
            {
                fail("HLSL", e.to_string());
            }
            let spv_pipeline = spv::PipelineOptions { shader_stage: stage, entry_point: ep.clone() };
            if let Err(e) = guarded(|| {
                spv::write_vec(&module, &info, &spv::Options::default(), Some(&spv_pipeline)).map(|_| ())
            }) {
                fail("SPIR-V", e);
            }
            // GLSL has no half type and wgpu's GL backend never offers SHADER_F16 or
            // SUBGROUP, so those variants are never built there (graphs fall back to f32,
            // reductions to the workgroup tree; tested).
            if f16 || variant.needs_subgroups() {
                translated += 1;
                continue;
            }
            let glsl_pipeline =
                glsl::PipelineOptions { shader_stage: stage, entry_point: ep.clone(), multiview: None };
            let mut text = String::new();
            let written = guarded(|| {
                glsl::Writer::new(
                    &mut text,
                    &module,
                    &info,
                    &glsl::Options::default(),
                    &glsl_pipeline,
                    naga::proc::BoundsCheckPolicies::default(),
                )
                .and_then(|mut w| w.write().map(|_| ()))
            });
            if let Err(e) = written {
                fail("GLSL ES 3.1", e);
            }
            translated += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(translated >= 40, "only {translated} entry points found");
    eprintln!("{translated} entry points translated to MSL, HLSL, SPIR-V and GLSL");
}
