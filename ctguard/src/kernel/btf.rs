//! Field offsets, sizes and enum values of the running kernel, read from its
//! BTF (`/sys/kernel/btf/vmlinux`, plus a module's split BTF when asked).
//!
//! ctguard never compiles a kernel struct layout in: these lookups feed the
//! read-only globals of the kernel programs (see `sensors::layout`).
use std::path::Path;

use btf_rs::{Btf, BtfType, Type};
use fallible_iterator::FallibleIterator;

use crate::error::CtguardError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A loaded BTF blob with the lookups ctguard needs.
pub struct KernelBtf {
    btf: Btf,
}

/// Where a member sits: byte offset from the start of the outer struct, and
/// the BTF id of its type.
#[derive(Clone, Copy, Debug)]
struct Located {
    offset_bits: u32,
    type_id: u32,
}

impl KernelBtf {
    /// The running kernel's vmlinux BTF.
    pub fn vmlinux() -> Result<Self, CtguardError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, CtguardError> {
        let btf = Btf::from_file(path)
            .map_err(|e| CtguardError::Btf { what: format!("cannot read {}: {e}", path.display()) })?;
        Ok(Self { btf })
    }

    /// vmlinux BTF extended with a module's split BTF (e.g. nf_conntrack).
    pub fn with_module(module: &str) -> Result<Self, CtguardError> {
        let base = Btf::from_file(VMLINUX_BTF)
            .map_err(|e| CtguardError::Btf { what: format!("cannot read {VMLINUX_BTF}: {e}") })?;
        let path = format!("/sys/kernel/btf/{module}");
        let btf = Btf::from_split_file(&path, &base)
            .map_err(|e| CtguardError::Btf { what: format!("cannot read {path}: {e}") })?;
        Ok(Self { btf })
    }

    fn missing(what: String) -> CtguardError {
        CtguardError::Btf { what }
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<Type, CtguardError> {
        loop {
            let t = self.btf.resolve_type_by_id(id).map_err(|e| Self::missing(format!("BTF type id {id}: {e}")))?;
            match &t {
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                    id = t
                        .as_btf_type()
                        .and_then(|b| b.get_type_id())
                        .ok_or_else(|| Self::missing(format!("BTF type id {id} has no target")))?;
                }
                _ => return Ok(t),
            }
        }
    }

    /// The id of the struct (or union) called `name` that has members: the
    /// kernel's BTF may also carry forward declarations of the same name.
    fn struct_id(&self, name: &str) -> Result<u32, CtguardError> {
        let ids = self.btf.resolve_ids_by_name(name).unwrap_or_default();
        ids.into_iter()
            .find(|id| {
                matches!(self.btf.resolve_type_by_id(*id),
                    Ok(Type::Struct(s)) | Ok(Type::Union(s)) if !s.members.is_empty())
            })
            .ok_or_else(|| Self::missing(format!("struct {name} is not in the kernel's BTF")))
    }

    /// Size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, CtguardError> {
        match self.resolve(self.struct_id(name)?)? {
            Type::Struct(s) | Type::Union(s) => Ok(s.size() as u32),
            _ => Err(Self::missing(format!("{name} is not a struct"))),
        }
    }

    /// Byte offset of `path` (e.g. `["tuplehash", "tuple", "dst", "protonum"]`)
    /// inside `struct name`. Anonymous structs and unions are searched
    /// transparently; arrays are entered at element 0.
    pub fn offset(&self, name: &str, path: &[&str]) -> Result<u32, CtguardError> {
        let mut here = Located { offset_bits: 0, type_id: self.struct_id(name)? };
        for field in path {
            here = self
                .find_member(here.type_id, field)?
                .map(|m| Located { offset_bits: here.offset_bits + m.offset_bits, type_id: m.type_id })
                .ok_or_else(|| Self::missing(format!("struct {name} has no member {}", path.join("."))))?;
        }
        if !here.offset_bits.is_multiple_of(8) {
            return Err(Self::missing(format!("{name}.{} is a bitfield", path.join("."))));
        }
        Ok(here.offset_bits / 8)
    }

    /// Like [`offset`](Self::offset), but `None` when the member does not exist
    /// (optional kernel features such as conntrack zones).
    pub fn optional_offset(&self, name: &str, path: &[&str]) -> Result<Option<u32>, CtguardError> {
        match self.offset(name, path) {
            Ok(off) => Ok(Some(off)),
            Err(CtguardError::Btf { what }) if what.contains("has no member") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn find_member(&self, type_id: u32, field: &str) -> Result<Option<Located>, CtguardError> {
        let members = match self.resolve(type_id)? {
            Type::Struct(s) | Type::Union(s) => s.members,
            Type::Array(a) => {
                let elem = a.get_type_id().unwrap_or(0);
                return self.find_member(elem, field);
            }
            _ => return Ok(None),
        };
        for m in &members {
            let member_type = m.get_type_id().unwrap_or(0);
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == field {
                return Ok(Some(Located { offset_bits: m.bit_offset(), type_id: member_type }));
            }
            if name.is_empty()
                && let Some(inner) = self.find_member(member_type, field)?
            {
                return Ok(Some(Located { offset_bits: m.bit_offset() + inner.offset_bits, type_id: inner.type_id }));
            }
        }
        Ok(None)
    }

    /// Value of enumerator `variant`, searching every enum that has it.
    pub fn enum_value(&self, variant: &str) -> Result<u64, CtguardError> {
        let mut types = self.btf.type_iter();
        while let Ok(Some(t)) = types.next() {
            match &t {
                Type::Enum(e) => {
                    for m in &e.members {
                        if self.btf.resolve_name(m).is_ok_and(|n| n == variant) {
                            return Ok(m.val() as u64);
                        }
                    }
                }
                Type::Enum64(e) => {
                    for m in &e.members {
                        if self.btf.resolve_name(m).is_ok_and(|n| n == variant) {
                            return Ok(m.val());
                        }
                    }
                }
                _ => {}
            }
        }
        Err(Self::missing(format!("enumerator {variant} is not in the kernel's BTF")))
    }

    /// Number of arguments a BTF-enabled tracepoint passes to its programs,
    /// from the `btf_trace_<name>` typedef (its first parameter, `void *__data`,
    /// is not passed and not counted).
    pub fn tracepoint_arg_count(&self, tracepoint: &str) -> Result<usize, CtguardError> {
        let typedef = format!("btf_trace_{tracepoint}");
        let id = *self
            .btf
            .resolve_ids_by_name(&typedef)
            .unwrap_or_default()
            .first()
            .ok_or_else(|| Self::missing(format!("tracepoint {tracepoint} has no BTF ({typedef})")))?;
        let ptr = self.resolve(id)?;
        let proto_id = ptr
            .as_btf_type()
            .and_then(|b| b.get_type_id())
            .ok_or_else(|| Self::missing(format!("{typedef} is not a function pointer")))?;
        match self.resolve(proto_id)? {
            Type::FuncProto(p) => Ok(p.parameters.len().saturating_sub(1)),
            _ => Err(Self::missing(format!("{typedef} is not a function pointer"))),
        }
    }

    /// The BTF id of the function `name` (what fentry/fexit attach to).
    pub fn function_id(&self, name: &str) -> Result<u32, CtguardError> {
        let ids = self.btf.resolve_ids_by_name(name).unwrap_or_default();
        ids.into_iter()
            .find(|id| matches!(self.btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
            .ok_or_else(|| Self::missing(format!("function {name} is not in this BTF")))
    }

    /// Whether a function named `name` is described in this BTF.
    pub fn has_function(&self, name: &str) -> bool {
        self.btf.resolve_types_by_name(name).unwrap_or_default().iter().any(|t| matches!(t, Type::Func(_)))
    }
}
