//! Code shared by mcrelay's kernel programs (`relay` and `client` binaries). It also gives the
//! crate a library target, which lets `relay` list it as a build-dependency (and rebuild when
//! it changes).
#![no_std]

use relay_common::parse::Frame;

/// The packet between `data` and `data_end`, read with bounds checks the verifier accepts.
/// Every packet read of the programs goes through [`Frame::read`].
pub struct PacketFrame {
    /// `ctx.data()`.
    pub start: usize,
    /// `ctx.data_end()`.
    pub end: usize,
}

impl Frame for PacketFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        read_between(self.start, self.end, offset)
    }
}

/// `N` bytes at `offset` from `start`, if they end before `end`.
///
/// The caller's `start..end` must be readable packet data (the program's context guarantees
/// it for `data..data_end`).
#[inline(always)]
fn read_between<const N: usize>(start: usize, end: usize, offset: usize) -> Option<[u8; N]> {
    let at = start + offset;
    if at + N > end {
        return None;
    }
    // SAFETY: `at..at + N` lies inside `start..end`, checked just above, which the caller
    // vouches for.
    Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
}

/// A socket buffer as the TC program sees it: reads are bounded by the linear part
/// (`data`..`data_end`), the length is the whole packet's (`skb->len`), so IP length checks
/// hold for packets whose payload lies in fragments.
pub struct SkbFrame {
    /// `ctx.data()`.
    pub start: usize,
    /// `ctx.data_end()`.
    pub end: usize,
    /// `skb->len`.
    pub len: usize,
}

impl Frame for SkbFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Bounded by the linear part, `data..data_end`.
        read_between(self.start, self.end, offset)
    }
}
