//! The `hrnet-ocr` command line.

use hrnet_ocr::gpu::{list_adapters, GpuOptions};
use hrnet_ocr::{Gpu, Result};
use std::process::ExitCode;

const USAGE: &str = "\
hrnet-ocr: HRNet-OCR semantic segmentation on WGSL compute shaders

usage: hrnet-ocr <command>

commands:
  info    every adapter found, and the limits and features of the one chosen

environment:
  WGPU_BACKEND        backends to search: vulkan, metal, dx12, gl (comma-separated)
  WGPU_ADAPTER_NAME   use the first adapter whose name contains this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") if args.len() == 1 => info(),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> Result<()> {
    let options = GpuOptions::from_env();
    let adapters = list_adapters(options.backends.unwrap_or(wgpu::Backends::all()));
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        println!(
            "  {} | backend {:?} | {:?} | driver {} {}",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
    }
    let gpu = Gpu::with_options(&options)?;
    println!("\nchosen: {}", gpu.describe());
    let l = gpu.limits();
    println!("limits:");
    for (name, value) in [
        ("max_buffer_size", l.max_buffer_size),
        ("max_storage_buffer_binding_size", l.max_storage_buffer_binding_size),
        ("max_storage_buffers_per_shader_stage", u64::from(l.max_storage_buffers_per_shader_stage)),
        ("max_compute_workgroup_storage_size", u64::from(l.max_compute_workgroup_storage_size)),
        ("max_compute_invocations_per_workgroup", u64::from(l.max_compute_invocations_per_workgroup)),
        ("max_compute_workgroup_size_x", u64::from(l.max_compute_workgroup_size_x)),
        ("max_compute_workgroups_per_dimension", u64::from(l.max_compute_workgroups_per_dimension)),
    ] {
        println!("  {name:<40} {value}");
    }
    println!("features used: {:?}", gpu.features());
    println!("adapter features: {:?}", gpu.adapter_features());
    Ok(())
}
