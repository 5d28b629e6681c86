//! Whether a state directory's owner and access list let anyone but us (and the OS's
//! own administrators) write to it: Windows' form of the Unix rule "owned by us, not
//! writable by group or others". The judgement is pure and tested everywhere; reading a
//! folder's security descriptor is Windows-only (`acl_windows.rs`).

/// Who a SID in the owner field or an access entry is, as far as the rule goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// LocalSystem (S-1-5-18), which the service runs as.
    System,
    /// The Administrators group (S-1-5-32-544).
    Administrators,
    /// The account agentd runs as.
    Me,
    /// CREATOR OWNER (S-1-3-0): stands for whoever creates a file inside, in entries
    /// that only pass down (it grants nothing on the folder itself).
    CreatorOwner,
    /// Anyone else: another user, Users, Authenticated Users, Everyone…
    Other,
}

/// One entry of a folder's access list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ace {
    /// An access-allowed entry (deny entries only take rights away).
    pub allow: bool,
    /// Applies only to what is created inside, not to the folder itself.
    pub inherit_only: bool,
    /// The access mask.
    pub mask: u32,
    pub who: Principal,
}

/// The rights that let someone change what is in a folder or its security: write or
/// append data (add a file or subfolder), write extended attributes or attributes,
/// delete a child, delete, write the access list, take ownership, and the generic
/// write and all.
pub const WRITE_RIGHTS: u32 = 0x0000_0002 // FILE_WRITE_DATA / FILE_ADD_FILE
    | 0x0000_0004 // FILE_APPEND_DATA / FILE_ADD_SUBDIRECTORY
    | 0x0000_0010 // FILE_WRITE_EA
    | 0x0000_0040 // FILE_DELETE_CHILD
    | 0x0000_0100 // FILE_WRITE_ATTRIBUTES
    | 0x0001_0000 // DELETE
    | 0x0004_0000 // WRITE_DAC
    | 0x0008_0000 // WRITE_OWNER
    | 0x1000_0000 // GENERIC_ALL
    | 0x4000_0000; // GENERIC_WRITE

/// Why the folder must not hold keys, or Ok. `dacl` None is a NULL access list, which
/// grants everyone everything.
pub fn judge(owner: Principal, dacl: Option<&[Ace]>) -> Result<(), String> {
    let trusted = |p: Principal| {
        matches!(
            p,
            Principal::System | Principal::Administrators | Principal::Me
        )
    };
    if !trusted(owner) {
        return Err("it belongs to another account".into());
    }
    let Some(dacl) = dacl else {
        return Err("it has no access list (everyone may change it)".into());
    };
    for ace in dacl {
        if !ace.allow || ace.inherit_only || ace.mask & WRITE_RIGHTS == 0 {
            continue;
        }
        if !trusted(ace.who) {
            return Err("its access list lets other accounts write to it".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(who: Principal, mask: u32) -> Ace {
        Ace {
            allow: true,
            inherit_only: false,
            mask,
            who,
        }
    }

    const FULL: u32 = 0x001F_01FF;
    const READ_EXECUTE: u32 = 0x0012_00A9;

    #[test]
    fn system_and_administrators_only_is_safe() {
        let dacl = [
            allow(Principal::System, FULL),
            allow(Principal::Administrators, FULL),
        ];
        assert_eq!(judge(Principal::Administrators, Some(&dacl)), Ok(()));
        // A user's own profile folder: the user, SYSTEM and Administrators.
        let dacl = [
            allow(Principal::Me, FULL),
            allow(Principal::System, FULL),
            allow(Principal::Administrators, FULL),
        ];
        assert_eq!(judge(Principal::Me, Some(&dacl)), Ok(()));
    }

    #[test]
    fn other_accounts_may_read_but_not_write() {
        let read = [
            allow(Principal::System, FULL),
            allow(Principal::Other, READ_EXECUTE),
        ];
        assert_eq!(judge(Principal::System, Some(&read)), Ok(()));
        for right in [
            0x2,
            0x4,
            0x40,
            0x1_0000,
            0x4_0000,
            0x8_0000,
            0x1000_0000,
            0x4000_0000,
        ] {
            let dacl = [
                allow(Principal::System, FULL),
                allow(Principal::Other, READ_EXECUTE | right),
            ];
            assert!(judge(Principal::System, Some(&dacl)).is_err(), "{right:#x}");
        }
    }

    #[test]
    fn entries_that_only_pass_down_or_deny_do_not_count() {
        // ProgramData's "CREATOR OWNER: full, inherit only" and a deny entry.
        let dacl = [
            allow(Principal::System, FULL),
            Ace {
                inherit_only: true,
                ..allow(Principal::Other, FULL)
            },
            Ace {
                allow: false,
                ..allow(Principal::Other, FULL)
            },
            allow(Principal::CreatorOwner, 0),
        ];
        assert_eq!(judge(Principal::System, Some(&dacl)), Ok(()));
        // CREATOR OWNER with rights on the folder itself is someone else.
        let dacl = [allow(Principal::CreatorOwner, FULL)];
        assert!(judge(Principal::System, Some(&dacl)).is_err());
    }

    #[test]
    fn another_owner_or_no_access_list_is_refused() {
        let dacl = [allow(Principal::System, FULL)];
        assert_eq!(
            judge(Principal::Other, Some(&dacl)),
            Err("it belongs to another account".to_string())
        );
        assert!(judge(Principal::System, None).is_err());
    }
}
