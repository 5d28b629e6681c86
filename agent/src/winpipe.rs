//! The local API pipe's access list on Windows: LocalSystem and Administrators, nobody
//! else. Windows' default security would also let every local user open the pipe for
//! reading, which is enough to hold the API's connection slots and lock agentctl out.
//!
//! Unsafe code (with `acl_windows.rs`, the agent's only): turning an SDDL string into a security descriptor
//! (Win32), and handing it to tokio's pipe creation.
#![allow(unsafe_code)]

use std::ffi::{c_void, OsStr};

use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES};

/// A protected DACL (nothing inherited): GENERIC_ALL for LocalSystem (SY) and the
/// Administrators group (BA).
const ADMINS_ONLY: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)";

/// Security attributes for new pipe instances; the descriptor lives as long as this.
pub struct PipeSecurity(Box<SECURITY_ATTRIBUTES>);

impl std::fmt::Debug for PipeSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ADMINS_ONLY)
    }
}

// SAFETY: the descriptor is written once (in `admins_only`) and only read afterwards, by
// CreateNamedPipeW; nothing else holds the pointer.
unsafe impl Send for PipeSecurity {}
// SAFETY: as above; shared reads of an immutable descriptor.
unsafe impl Sync for PipeSecurity {}

impl PipeSecurity {
    /// LocalSystem and Administrators only; None if Windows refuses the descriptor.
    pub fn admins_only() -> Option<Self> {
        let wide: Vec<u16> = ADMINS_ONLY.encode_utf16().chain(Some(0)).collect();
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `wide` is NUL-terminated and outlives the call; `sd` receives a
        // descriptor allocated with LocalAlloc, freed in Drop.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                wide.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 || sd.is_null() {
            return None;
        }
        Some(PipeSecurity(Box::new(SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: sd,
            bInheritHandle: 0,
        })))
    }

    /// Creates a pipe instance `name` with these attributes.
    pub fn create(&self, opts: &ServerOptions, name: &OsStr) -> std::io::Result<NamedPipeServer> {
        let attrs: *const SECURITY_ATTRIBUTES = &*self.0;
        // SAFETY: `attrs` points at a valid SECURITY_ATTRIBUTES whose descriptor lives
        // as long as `self`, which outlives the call (CreateNamedPipeW copies it).
        unsafe { opts.create_with_security_attributes_raw(name, attrs as *mut c_void) }
    }
}

impl Drop for PipeSecurity {
    fn drop(&mut self) {
        // SAFETY: the descriptor came from LocalAlloc (via the SDDL conversion) and is
        // freed once, here.
        unsafe {
            LocalFree(self.0.lpSecurityDescriptor);
        }
    }
}
