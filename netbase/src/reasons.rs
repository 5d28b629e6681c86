//! Counted reasons: an enum that names why something was dropped, closed or lost, and
//! counts per reason that always list every reason (zeros included), so a dashboard or
//! `agentctl status` shows the same names whether or not anything happened yet.
//!
//! ```
//! netbase::reasons! {
//!     /// Why a packet was dropped.
//!     pub enum Drop {
//!         /// No such peer.
//!         UnknownPeer => "unknown_peer",
//!         QueueFull => "queue_full",
//!     }
//! }
//! let mut c = netbase::reasons::Counts::<Drop>::default();
//! c.add(Drop::QueueFull);
//! assert_eq!(c.iter().collect::<Vec<_>>(), [("unknown_peer", 0), ("queue_full", 1)]);
//! ```

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// An enum of reasons, each with a stable label; see [`reasons!`](crate::reasons!).
pub trait Reason: Copy + PartialEq + std::fmt::Debug + 'static {
    /// Every reason, in a fixed order.
    const ALL: &'static [Self];

    /// The reason's name in counters and logs (`snake_case`).
    fn label(self) -> &'static str;

    /// Where the reason is in [`Reason::ALL`].
    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Defines an enum of reasons with their labels, implementing [`Reason`] and `Display`
/// (the label).
#[macro_export]
macro_rules! reasons {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $crate::reasons::Reason for $name {
            const ALL: &'static [$name] = &[$($name::$variant),+];
            fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str($crate::reasons::Reason::label(*self))
            }
        }
    };
}

/// A count per reason, for one owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts<R: Reason> {
    n: Vec<u64>,
    _reason: PhantomData<R>,
}

impl<R: Reason> Default for Counts<R> {
    fn default() -> Self {
        Counts {
            n: vec![0; R::ALL.len()],
            _reason: PhantomData,
        }
    }
}

impl<R: Reason> Counts<R> {
    pub fn add(&mut self, reason: R) {
        if let Some(n) = self.n.get_mut(reason.index()) {
            *n += 1;
        }
    }

    pub fn get(&self, reason: R) -> u64 {
        self.n.get(reason.index()).copied().unwrap_or(0)
    }

    /// (label, count) for every reason, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        R::ALL.iter().zip(&self.n).map(|(r, n)| (r.label(), *n))
    }
}

/// A count per reason, updated from any task.
#[derive(Debug)]
pub struct AtomicCounts<R: Reason> {
    n: Vec<AtomicU64>,
    _reason: PhantomData<R>,
}

impl<R: Reason> Default for AtomicCounts<R> {
    fn default() -> Self {
        AtomicCounts {
            n: R::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            _reason: PhantomData,
        }
    }
}

impl<R: Reason> AtomicCounts<R> {
    pub fn add(&self, reason: R) {
        if let Some(n) = self.n.get(reason.index()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, reason: R) -> u64 {
        self.n
            .get(reason.index())
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// (label, count) for every reason, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        R::ALL
            .iter()
            .zip(&self.n)
            .map(|(r, n)| (r.label(), n.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::reasons! {
        enum Why {
            A => "a",
            /// Documented.
            B => "b_reason",
            C => "c",
        }
    }

    #[test]
    fn every_reason_is_listed_and_counted_apart() {
        assert_eq!(Why::ALL, &[Why::A, Why::B, Why::C]);
        assert_eq!(Why::B.to_string(), "b_reason");
        let mut c = Counts::<Why>::default();
        c.add(Why::C);
        c.add(Why::C);
        c.add(Why::A);
        assert_eq!((c.get(Why::A), c.get(Why::B), c.get(Why::C)), (1, 0, 2));
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            [("a", 1), ("b_reason", 0), ("c", 2)]
        );
        let a = AtomicCounts::<Why>::default();
        a.add(Why::B);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("a", 0), ("b_reason", 1), ("c", 0)]
        );
        assert_eq!(a.get(Why::B), 1);
    }
}
