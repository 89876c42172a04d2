//! The addresses of one byte of device memory, as each party sees it (DESIGN.md): the CPU's
//! physical address (sysfs `resource`), the PCI bus address a peer behind the same switch puts
//! on the link (the BAR register: the CPU address corrected by the host bridge's offset), and
//! the IOVA a device behind an IOMMU uses. Each its own type, so that one cannot be passed for
//! another; arithmetic is checked, since an address past the end of the space is a bug.

use std::fmt;

pub use p2pnvmf_config::pci::Addressing;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            pub const fn new(addr: u64) -> Self {
                $name(addr)
            }

            pub const fn get(self) -> u64 {
                self.0
            }

            /// `off` bytes further; `None` past the end of the 64-bit space.
            pub fn checked_add(self, off: u64) -> Option<Self> {
                self.0.checked_add(off).map($name)
            }
        }

        /// `off` bytes into a region known to fit (a window inside its mapping, a CMB inside
        /// its BAR).
        ///
        /// # Panics
        /// Past the end of the 64-bit space: the region did not fit after all.
        impl std::ops::Add<u64> for $name {
            type Output = $name;

            fn add(self, off: u64) -> $name {
                self.checked_add(off).unwrap_or_else(|| panic!("{self} + {off:#x} is past the end of the address space"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
    };
}

address! {
    /// A CPU physical address.
    CpuAddr
}

address! {
    /// A PCI bus address: what a device puts on PCIe to reach memory without an IOMMU
    /// between them.
    BusAddr
}

address! {
    /// An I/O virtual address: what a device behind an IOMMU uses, mapped by whoever drives it.
    Iova
}

impl BusAddr {
    /// Bus address − CPU address of the same byte: the host bridge's offset, as Linux keeps it
    /// per p2p provider (wrapping: it may be "negative").
    pub fn offset_from(self, cpu: CpuAddr) -> u64 {
        self.0.wrapping_sub(cpu.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked_and_each_kind_says_what_it_is() {
        let b = BusAddr::new(0x8000_0000);
        assert_eq!(b + 0x1000, BusAddr::new(0x8000_1000));
        assert_eq!(BusAddr::new(u64::MAX).checked_add(1), None);
        assert_eq!(format!("{b} {b:?}"), "0x80000000 BusAddr(0x80000000)");
        // A bridge offset below the CPU address wraps, as Linux's pci_p2pdma does.
        let cpu = CpuAddr::new(0x6000_0000_0000);
        assert_eq!(cpu.get().wrapping_add(b.offset_from(cpu)), b.get());
        assert_eq!(format!("{:?}", Iova::new(1 << 32)), "Iova(0x100000000)");
    }

    #[test]
    #[should_panic(expected = "past the end of the address space")]
    fn an_offset_past_the_end_is_a_bug() {
        let _ = CpuAddr::new(u64::MAX - 1) + 2;
    }
}
