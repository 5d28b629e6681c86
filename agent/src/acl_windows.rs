//! Reads a folder's owner and access list on Windows, for [`crate::acl::judge`]. Unsafe
//! Win32 calls, confined here: GetNamedSecurityInfoW, the well-known SIDs, and the
//! process token's user.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::windows::ffi::OsStrExt as _;
use std::path::Path;

use windows_sys::Win32::Foundation::{CloseHandle, LocalFree, HANDLE};
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSidToSidW, GetNamedSecurityInfoW, SE_FILE_OBJECT,
};
use windows_sys::Win32::Security::{
    EqualSid, GetAce, GetTokenInformation, TokenUser, ACCESS_ALLOWED_ACE, ACE_HEADER, ACL,
    DACL_SECURITY_INFORMATION, OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, TOKEN_QUERY,
    TOKEN_USER,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use crate::acl::{Ace, Principal};

/// ACE types and flags (winnt.h).
const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;
const ACCESS_DENIED_ACE_TYPE: u8 = 1;
const INHERIT_ONLY_ACE: u8 = 0x08;

/// A SID made from its text form, freed on drop.
struct OwnedSid(PSID);

impl OwnedSid {
    fn parse(text: &str) -> std::io::Result<OwnedSid> {
        let wide: Vec<u16> = text.encode_utf16().chain(Some(0)).collect();
        let mut sid: PSID = std::ptr::null_mut();
        // SAFETY: `wide` is NUL-terminated and outlives the call; `sid` receives a
        // LocalAlloc'd SID, freed in Drop.
        if unsafe { ConvertStringSidToSidW(wide.as_ptr(), &mut sid) } == 0 || sid.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedSid(sid))
    }
}

impl Drop for OwnedSid {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSidToSidW with LocalAlloc, freed once.
        unsafe {
            LocalFree(self.0);
        }
    }
}

/// The process token's user SID, in a buffer that holds the TOKEN_USER it points into.
struct MyUser(Vec<u64>);

impl MyUser {
    fn get() -> std::io::Result<MyUser> {
        let mut token: HANDLE = std::ptr::null_mut();
        // SAFETY: a pseudo-handle for our own process; `token` receives a real handle,
        // closed below.
        if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut len = 0u32;
        // SAFETY: a size query (no buffer); `len` receives the size needed.
        unsafe { GetTokenInformation(token, TokenUser, std::ptr::null_mut(), 0, &mut len) };
        let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
        // SAFETY: `buf` has at least `len` bytes, 8-aligned (enough for TOKEN_USER).
        let ok = unsafe {
            GetTokenInformation(
                token,
                TokenUser,
                buf.as_mut_ptr().cast::<c_void>(),
                (buf.len() * 8) as u32,
                &mut len,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: the handle came from OpenProcessToken and is closed once.
        unsafe { CloseHandle(token) };
        if ok == 0 {
            return Err(err);
        }
        Ok(MyUser(buf))
    }

    fn sid(&self) -> PSID {
        // SAFETY: the buffer starts with the TOKEN_USER GetTokenInformation wrote; its
        // SID points into the same buffer, alive as long as `self`.
        unsafe { (*self.0.as_ptr().cast::<TOKEN_USER>()).User.Sid }
    }
}

/// The owner and access list of the folder `path` (None: a NULL access list).
pub fn read(path: &Path) -> std::io::Result<(Principal, Option<Vec<Ace>>)> {
    let system = OwnedSid::parse("S-1-5-18")?;
    let admins = OwnedSid::parse("S-1-5-32-544")?;
    let creator = OwnedSid::parse("S-1-3-0")?;
    let me = MyUser::get()?;
    let classify = |sid: PSID| {
        // SAFETY: every SID compared is valid for the duration of this call.
        let eq = |other: PSID| unsafe { EqualSid(sid, other) } != 0;
        if eq(system.0) {
            Principal::System
        } else if eq(admins.0) {
            Principal::Administrators
        } else if eq(me.sid()) {
            Principal::Me
        } else if eq(creator.0) {
            Principal::CreatorOwner
        } else {
            Principal::Other
        }
    };
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut owner: PSID = std::ptr::null_mut();
    let mut dacl: *mut ACL = std::ptr::null_mut();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `wide` is NUL-terminated; `owner` and `dacl` point into `sd`, which is
    // LocalAlloc'd and freed below after the last use of either.
    let err = unsafe {
        GetNamedSecurityInfoW(
            wide.as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            &mut dacl,
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err as i32));
    }
    let owner_is = classify(owner);
    let aces = if dacl.is_null() {
        None
    } else {
        // SAFETY: `dacl` is a valid ACL inside `sd`.
        let count = unsafe { (*dacl).AceCount };
        let mut out = Vec::with_capacity(usize::from(count));
        for i in 0..u32::from(count) {
            let mut ace: *mut c_void = std::ptr::null_mut();
            // SAFETY: `i` is below the ACL's count; `ace` receives a pointer into it.
            if unsafe { GetAce(dacl, i, &mut ace) } == 0 || ace.is_null() {
                continue;
            }
            // SAFETY: every ACE starts with an ACE_HEADER.
            let header = unsafe { *ace.cast::<ACE_HEADER>() };
            if header.AceType != ACCESS_ALLOWED_ACE_TYPE && header.AceType != ACCESS_DENIED_ACE_TYPE
            {
                continue;
            }
            // SAFETY: allowed and denied ACEs share ACCESS_ALLOWED_ACE's layout; the SID
            // starts at SidStart and lies within the ACE.
            let (mask, sid) = unsafe {
                let a = ace.cast::<ACCESS_ALLOWED_ACE>();
                (
                    (*a).Mask,
                    std::ptr::addr_of_mut!((*a).SidStart).cast::<c_void>(),
                )
            };
            out.push(Ace {
                allow: header.AceType == ACCESS_ALLOWED_ACE_TYPE,
                inherit_only: header.AceFlags & INHERIT_ONLY_ACE != 0,
                mask,
                who: classify(sid),
            });
        }
        Some(out)
    };
    // SAFETY: `sd` came from GetNamedSecurityInfoW (LocalAlloc) and is freed once;
    // nothing points into it after this.
    unsafe {
        LocalFree(sd);
    }
    Ok((owner_is, aces))
}
