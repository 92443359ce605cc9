//! The contract between a launcher and its shader, checked rather than remembered.
//!
//! A kernel's uniform `Params` exists twice, as a Rust struct and as a WGSL struct, and its
//! storage bindings are slots a launcher names by number. Nothing in wgpu ties the two
//! sides together: a swapped field, a wrong slot or a read-only binding the shader writes
//! would run and compute garbage. So each shader is read once by naga reflection (and its
//! validator, which tells which globals each entry point reads and writes), and every
//! dispatch is checked against it before it is built: the `Params` fields (names, byte
//! offsets, size) against the struct at binding 0, and the bound tensors against the
//! storage buffers the entry point uses: the same slots, each bound writable exactly when
//! it is declared `read_write` (that, not what the entry does with it, is the usage wgpu
//! tracks), with the declared element type. A mismatch is an error naming the kernel, the
//! field or slot, and both sides.

use super::{BufferBinding, DType};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// A kernel's uniform parameters as the launcher lays them out: `#[repr(C)]` plain data
/// with the name and byte offset of every field. Declared with `shader_params!`.
pub trait ShaderParams: bytemuck::Pod {
    /// (name, byte offset) of each field, in declaration order.
    const FIELDS: &'static [(&'static str, usize)];
}

/// Declares a kernel's `Params`: a `#[repr(C)]` plain-data struct and its
/// [`ShaderParams`] field table. Fields named with a leading `_` are padding: the WGSL side
/// may spell its padding differently, so only the size covers them.
macro_rules! shader_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($field: $ty),* }

        impl $crate::gpu::ShaderParams for $name {
            const FIELDS: &'static [(&'static str, usize)] =
                &[$((stringify!($field), ::core::mem::offset_of!($name, $field))),*];
        }
    };
}
pub(crate) use shader_params;

/// A storage binding as the shader declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    name: String,
    /// Declared `read_write`.
    writable: bool,
    /// The element's scalar type.
    dtype: Option<DType>,
}

/// What a shader module declares at group 0: the `Params` struct at binding 0, the
/// storage buffers at the others, and which of those each entry point uses.
#[derive(Clone, Debug, Default)]
pub(crate) struct Interface {
    /// (member name, byte offset) of the uniform struct, and its size in bytes.
    params: Option<(Vec<(String, u32)>, u32)>,
    storage: HashMap<u32, Slot>,
    /// Per entry point: the storage slots it uses, and whether it writes each.
    uses: HashMap<String, Vec<(u32, bool)>>,
}

impl Interface {
    /// Reads the declarations of a WGSL source.
    pub(crate) fn reflect(shader: &str, source: &str) -> Result<Self> {
        let module = naga::front::wgsl::parse_str(source)
            .map_err(|e| Error::Device(format!("shaders/{shader}.wgsl: {}", e.emit_to_string(source))))?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .map_err(|e| Error::Device(format!("shaders/{shader}.wgsl: {}", e.emit_to_string(source))))?;
        let mut interface = Interface::default();
        for (i, entry) in module.entry_points.iter().enumerate() {
            let used = info.get_entry_point(i);
            let slots = module
                .global_variables
                .iter()
                .filter(|(h, v)| {
                    !used[*h].is_empty() && matches!(v.space, naga::AddressSpace::Storage { .. })
                })
                .filter_map(|(h, v)| {
                    Some((v.binding?.binding, used[h].contains(naga::valid::GlobalUse::WRITE)))
                })
                .collect();
            interface.uses.insert(entry.name.clone(), slots);
        }
        for (_, var) in module.global_variables.iter() {
            let Some(binding) = var.binding.filter(|b| b.group == 0) else { continue };
            let inner = &module.types[var.ty].inner;
            match var.space {
                naga::AddressSpace::Uniform if binding.binding == 0 => {
                    if let naga::TypeInner::Struct { members, span } = inner {
                        let fields =
                            members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset)).collect();
                        interface.params = Some((fields, *span));
                    }
                }
                naga::AddressSpace::Storage { access } => {
                    let slot = Slot {
                        name: var.name.clone().unwrap_or_default(),
                        writable: access.contains(naga::StorageAccess::STORE),
                        dtype: element_dtype(&module, inner),
                    };
                    interface.storage.insert(binding.binding, slot);
                }
                _ => {}
            }
        }
        Ok(interface)
    }

    /// Checks a launch of `entry` with `P` and `bindings` against the declarations.
    pub(crate) fn check<P: ShaderParams>(
        &self,
        shader: &str,
        entry: &str,
        bindings: &[BufferBinding<'_>],
    ) -> Result<()> {
        self.params_disagreement::<P>().or_else(|| self.bindings_disagreement(entry, bindings)).map_or(
            Ok(()),
            |what| {
                Err(Error::Invalid(format!(
                    "{shader}.wgsl:{entry}: the launcher and the shader disagree: {what}"
                )))
            },
        )
    }

    /// How `P` differs from the shader's `Params`: the first field whose name or byte offset
    /// differs (padding aside), or the size.
    fn params_disagreement<P: ShaderParams>(&self) -> Option<String> {
        let Some((members, span)) = &self.params else {
            return Some("the shader declares no uniform struct at binding 0".into());
        };
        let rust: Vec<(&str, u32)> =
            P::FIELDS.iter().filter(|(n, _)| !n.starts_with('_')).map(|&(n, o)| (n, o as u32)).collect();
        let wgsl: Vec<(&str, u32)> =
            members.iter().filter(|(n, _)| !n.starts_with('_')).map(|(n, o)| (n.as_str(), *o)).collect();
        if rust != wgsl {
            let at = rust.iter().zip(&wgsl).position(|(a, b)| a != b).unwrap_or(rust.len().min(wgsl.len()));
            return Some(format!(
                "Params field {at}: Rust has {:?}, WGSL has {:?} (name, byte offset)",
                rust.get(at),
                wgsl.get(at)
            ));
        }
        let size = std::mem::size_of::<P>();
        (size != *span as usize).then(|| format!("Params is {size} bytes in Rust, {span} in WGSL"))
    }

    /// How `bindings` differ from the storage buffers `entry` uses: a slot it does not use
    /// or does not declare, another access or element type than declared, a `read_write`
    /// slot the entry only reads (wgpu would track a read as a write: declare a read-only
    /// view for readers), or a used slot left unbound.
    fn bindings_disagreement(&self, entry: &str, bindings: &[BufferBinding<'_>]) -> Option<String> {
        let Some(uses) = self.uses.get(entry) else {
            return Some("the shader has no such entry point".into());
        };
        let access = |w: bool| if w { "read_write" } else { "read" };
        for b in bindings {
            let Some(slot) = self.storage.get(&b.index) else {
                return Some(format!(
                    "binding {} is bound but the shader declares no storage buffer there",
                    b.index
                ));
            };
            let Some(&(_, writes)) = uses.iter().find(|(s, _)| *s == b.index) else {
                return Some(format!(
                    "binding {} ({}) is bound but the entry point never uses it",
                    b.index, slot.name
                ));
            };
            if slot.writable && !writes {
                return Some(format!(
                    "binding {} ({}) is declared read_write but the entry point only reads it",
                    b.index, slot.name
                ));
            }
            if slot.writable != b.writes {
                return Some(format!(
                    "binding {} ({}) is bound {} but declared {}",
                    b.index,
                    slot.name,
                    access(b.writes),
                    access(slot.writable)
                ));
            }
            if slot.dtype != Some(b.dtype) {
                return Some(format!(
                    "binding {} ({}) holds {:?} elements in the shader, the launcher binds {:?}",
                    b.index, slot.name, slot.dtype, b.dtype
                ));
            }
        }
        let (missing, _) = uses.iter().find(|(s, _)| !bindings.iter().any(|b| b.index == *s))?;
        let name = self.storage.get(missing).map_or("", |s| s.name.as_str());
        Some(format!("binding {missing} ({name}) is used by the entry point but not bound"))
    }
}

/// The scalar type of a storage buffer's elements (arrays of scalars, vectors, matrices
/// or atomics).
fn element_dtype(module: &naga::Module, inner: &naga::TypeInner) -> Option<DType> {
    let scalar = match inner {
        naga::TypeInner::Array { base, .. } => match &module.types[*base].inner {
            naga::TypeInner::Scalar(s) | naga::TypeInner::Atomic(s) => *s,
            naga::TypeInner::Vector { scalar, .. } | naga::TypeInner::Matrix { scalar, .. } => *scalar,
            _ => return None,
        },
        _ => return None,
    };
    match scalar.kind {
        naga::ScalarKind::Float if scalar.width == 2 => Some(DType::F16),
        naga::ScalarKind::Float => Some(DType::F32),
        naga::ScalarKind::Uint => Some(DType::U32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Shader;
    use crate::tensor::Binding;

    /// The buffer ranges of tensor bindings, as launchers pass them.
    fn ranges<'a>(bindings: &[Binding<'a>]) -> Vec<BufferBinding<'a>> {
        bindings.iter().map(|b| b.to_buffer()).collect()
    }

    crate::gpu::shader_params! {
        struct Pair { a: u32, b: f32, _pad: [u32; 2] }
    }

    crate::gpu::shader_params! {
        struct Swapped { b: f32, a: u32, _pad: [u32; 2] }
    }

    const SOURCE: &str = "struct Params { a: u32, b: f32, _p0: u32, _p1: u32, }
        @group(0) @binding(0) var<uniform> p: Params;
        @group(0) @binding(1) var<storage, read> x: array<f32>;
        @group(0) @binding(2) var<storage, read_write> y: array<u32>;
        @compute @workgroup_size(1) fn main() { y[0] = u32(x[0]) + p.a; }
        @compute @workgroup_size(1) fn peek() { if y[0] > p.a { return; } }";

    #[test]
    fn every_shader_declares_its_params_and_typed_storage() {
        for shader in Shader::ALL {
            let (name, source) = (shader.name(), shader.source().unwrap());
            let iface = Interface::reflect(name, &source).unwrap();
            assert!(iface.params.is_some(), "{name}: no Params at binding 0");
            assert!(!iface.storage.is_empty(), "{name}: no storage buffers");
            for (slot, s) in &iface.storage {
                assert!(s.dtype.is_some(), "{name} binding {slot} ({}): element type not f32 or u32", s.name);
            }
        }
    }

    /// Every entry point writes each `read_write` buffer it uses: one that only reads a
    /// buffer another entry writes reads it through a read-only declaration.
    #[test]
    fn no_entry_point_uses_a_read_write_buffer_it_only_reads() {
        let mut only_read = Vec::new();
        for shader in Shader::ALL {
            let iface = Interface::reflect(shader.name(), &shader.source().unwrap()).unwrap();
            for (entry, uses) in &iface.uses {
                for (slot, writes) in uses {
                    if iface.storage[slot].writable && !writes {
                        only_read.push(format!(
                            "{}.wgsl:{entry} binding {slot} ({})",
                            shader.name(),
                            iface.storage[slot].name
                        ));
                    }
                }
            }
        }
        only_read.sort();
        assert!(only_read.is_empty(), "read_write buffers only read:\n{}", only_read.join("\n"));
    }

    #[test]
    fn a_binding_of_another_slot_access_or_type_is_refused() {
        let gpu = crate::Gpu::new().unwrap();
        let iface = Interface::reflect("pair", SOURCE).unwrap();
        let x = crate::Tensor::zeros(&gpu, &[4]).unwrap();
        let y = crate::Tensor::empty_of(&gpu, &[4], DType::U32).unwrap();
        iface
            .check::<Pair>("pair", "main", &ranges(&[Binding::read(1, &x), Binding::write_u32(2, &y)]))
            .unwrap();
        let refused = |bindings: &[Binding<'_>], says: &str| {
            let err = iface.check::<Pair>("pair", "main", &ranges(bindings)).unwrap_err().to_string();
            assert!(err.contains("pair.wgsl:main") && err.contains(says), "{err}");
        };
        let y_f32 = crate::Tensor::zeros(&gpu, &[4]).unwrap();
        refused(
            &[Binding::write(1, &x), Binding::write_u32(2, &y)],
            "binding 1 (x) is bound read_write but declared read",
        );
        refused(
            &[Binding::read(1, &x), Binding::read_u32(2, &y)],
            "binding 2 (y) is bound read but declared read_write",
        );
        refused(&[Binding::read(1, &x), Binding::write(2, &y_f32)], "binding 2 (y) holds Some(U32) elements");
        refused(
            &[Binding::read(1, &x), Binding::write_u32(2, &y), Binding::read(3, &x)],
            "binding 3 is bound but the shader declares no storage buffer",
        );
        refused(&[Binding::read(1, &x)], "binding 2 (y) is used by the entry point but not bound");
        let err = iface
            .check::<Pair>("pair", "peek", &ranges(&[Binding::write_u32(2, &y)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pair.wgsl:peek")
                && err.contains("binding 2 (y) is declared read_write but the entry point only reads it"),
            "{err}"
        );
    }

    #[test]
    fn a_swapped_params_field_is_refused_naming_the_field() {
        let iface = Interface::reflect("pair", SOURCE).unwrap();
        assert_eq!(iface.params_disagreement::<Pair>(), None);
        let err = iface.params_disagreement::<Swapped>().unwrap();
        assert!(err.contains("field 0") && err.contains("(\"b\", 0)") && err.contains("(\"a\", 0)"), "{err}");
    }
}
