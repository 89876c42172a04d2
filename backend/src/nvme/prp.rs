//! Physical Region Page entries for a command's data (NVMe Base 2.0, 4.1.1): PRP1 points at the
//! first byte (any dword-aligned offset in its page), PRP2 at the second page when the data
//! ends there, else at a PRP list of the remaining pages' addresses. Pure: the caller says
//! where each page is for the device (an IOVA, a bus address, a physical address).

/// Why a buffer cannot be described with PRPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrpError {
    /// PRP1's offset must be dword aligned.
    Unaligned(u64),
    /// More pages than one PRP list page holds (the caller splits transfers at MDTS first).
    TooLong {
        pages: usize,
        list: usize,
    },
    Empty,
}

impl std::fmt::Display for PrpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrpError::Unaligned(a) => write!(f, "data address {a:#x} is not dword aligned"),
            PrpError::TooLong { pages, list } => {
                write!(f, "{pages} pages need more than one PRP list page ({list} entries)")
            }
            PrpError::Empty => write!(f, "no data"),
        }
    }
}

/// PRP1 and PRP2 for `len` bytes whose byte `off` is at device address `addr_of(off)` (asked
/// for offset 0 and for each later page start), in pages of `page` bytes. Entries beyond the
/// second page go into `list` (one page of the command's PRP list, at device address
/// `list_addr`); returns how many were written there.
pub fn build(
    len: usize,
    page: usize,
    addr_of: impl Fn(usize) -> u64,
    list: &mut [u64],
    list_addr: u64,
) -> Result<(u64, u64, usize), PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    let first = addr_of(0);
    if !first.is_multiple_of(4) {
        return Err(PrpError::Unaligned(first));
    }
    let in_first = page - (first as usize % page);
    if len <= in_first {
        return Ok((first, 0, 0));
    }
    // Byte offsets (in the buffer) where each following page starts.
    let rest = (in_first..len).step_by(page);
    let pages = rest.len();
    if pages == 1 {
        return Ok((first, addr_of(in_first), 0));
    }
    if pages > list.len() {
        return Err(PrpError::TooLong { pages: pages + 1, list: list.len() });
    }
    for (slot, off) in list.iter_mut().zip(rest) {
        *slot = addr_of(off).to_le();
    }
    Ok((first, list_addr, pages))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn linear(base: u64) -> impl Fn(usize) -> u64 {
        move |off| base + off as u64
    }

    #[test]
    fn one_two_and_many_pages() {
        let mut list = [0u64; 512];
        assert_eq!(build(4096, PAGE, linear(0x10_0000), &mut list, 0xdead_0000), Ok((0x10_0000, 0, 0)));
        assert_eq!(build(512, PAGE, linear(0x10_0e00), &mut list, 0xdead_0000), Ok((0x10_0e00, 0, 0)));
        // Starts 512 bytes before a page end: the second page holds the rest.
        assert_eq!(build(4096, PAGE, linear(0x10_0e00), &mut list, 0xdead_0000), Ok((0x10_0e00, 0x10_1000, 0)));
        assert_eq!(build(8192, PAGE, linear(0x10_0000), &mut list, 0xdead_0000), Ok((0x10_0000, 0x10_1000, 0)));
        // 128 KiB aligned: PRP1 + a list of 31 pages.
        let (p1, p2, n) = build(128 << 10, PAGE, linear(0x10_0000), &mut list, 0xdead_0000).unwrap();
        assert_eq!((p1, p2, n), (0x10_0000, 0xdead_0000, 31));
        assert!(list[..31].iter().enumerate().all(|(i, &e)| u64::from_le(e) == 0x10_1000 + (i as u64) * 4096));
        // Unaligned start: one more page, each entry page aligned.
        let (_, _, n) = build(8192, PAGE, linear(0x10_0200), &mut list, 0xdead_0000).unwrap();
        assert_eq!((n, u64::from_le(list[0]), u64::from_le(list[1])), (2, 0x10_1000, 0x10_2000));
    }

    #[test]
    fn pages_need_not_be_contiguous_for_the_device() {
        // Physical addresses of a buffer whose pages are scattered (no-IOMMU mode).
        let phys = [0x9000u64, 0x3000, 0x7000, 0x1000];
        let at = |off: usize| phys[off / PAGE] + (off % PAGE) as u64;
        let mut list = [0u64; 4];
        assert_eq!(build(4 * PAGE, PAGE, at, &mut list, 0x5000), Ok((0x9000, 0x5000, 3)));
        assert_eq!(list[..3].iter().map(|e| u64::from_le(*e)).collect::<Vec<_>>(), [0x3000, 0x7000, 0x1000]);
    }

    #[test]
    fn what_prps_cannot_describe_is_refused() {
        let mut list = [0u64; 2];
        assert_eq!(build(0, PAGE, linear(0), &mut list, 0), Err(PrpError::Empty));
        assert_eq!(build(8, PAGE, linear(0x1002), &mut list, 0), Err(PrpError::Unaligned(0x1002)));
        assert_eq!(build(4 * PAGE, PAGE, linear(0), &mut list, 0), Err(PrpError::TooLong { pages: 4, list: 2 }));
    }

    proptest::proptest! {
        /// Every byte of the buffer is covered exactly once, in order, by PRP1's page remainder
        /// and whole pages after it.
        #[test]
        fn entries_cover_the_buffer(start in 0u64..64, pages in 1usize..40, tail in 0usize..4096) {
            let base = 0x4000_0000 + start * 4;
            let len = (pages - 1) * PAGE + tail.max(4);
            let mut list = [0u64; 64];
            let (p1, p2, n) = build(len, PAGE, linear(base), &mut list, 0xabc000).unwrap();
            let mut covered = vec![(p1, PAGE - (p1 as usize % PAGE))];
            match n {
                0 if p2 != 0 => covered.push((p2, PAGE)),
                0 => {}
                _ => covered.extend(list[..n].iter().map(|e| (u64::from_le(*e), PAGE))),
            }
            let mut at = base;
            let mut left = len;
            for (addr, room) in covered {
                proptest::prop_assert_eq!(addr, at);
                let used = room.min(left);
                at += used as u64;
                left -= used;
            }
            proptest::prop_assert_eq!(left, 0);
        }
    }
}
