//! NVMe completion status (NVMe Base 2.0, Figure 101 and 102): a value, never an error type.

use std::fmt;

/// Status Code Type (SCT).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
}

/// The status field of a CQE without the phase bit: SC in bits 7:0, SCT in 10:8, DNR in 14.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Status(u16);

macro_rules! codes {
    ($($name:ident = ($sct:expr, $sc:expr);)*) => {
        impl Status {
            $(pub const $name: Status = Status::new($sct, $sc);)*
        }
    };
}

codes! {
    SUCCESS = (sct::GENERIC, 0x00);
    INVALID_OPCODE = (sct::GENERIC, 0x01);
    INVALID_FIELD = (sct::GENERIC, 0x02);
    DATA_TRANSFER_ERROR = (sct::GENERIC, 0x04);
    INTERNAL_ERROR = (sct::GENERIC, 0x06);
    ABORTED_BY_REQUEST = (sct::GENERIC, 0x07);
    INVALID_NAMESPACE = (sct::GENERIC, 0x0B);
    COMMAND_SEQUENCE_ERROR = (sct::GENERIC, 0x0C);
    INVALID_SGL_DESCRIPTOR = (sct::GENERIC, 0x0D);
    DATA_SGL_LENGTH_INVALID = (sct::GENERIC, 0x0F);
    SGL_TYPE_INVALID = (sct::GENERIC, 0x11);
    SGL_OFFSET_INVALID = (sct::GENERIC, 0x16);
    LBA_OUT_OF_RANGE = (sct::GENERIC, 0x80);
    CAPACITY_EXCEEDED = (sct::GENERIC, 0x81);
    INVALID_QUEUE_ID = (sct::COMMAND_SPECIFIC, 0x01);
    ASYNC_EVENT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x05);
    INVALID_LOG_PAGE = (sct::COMMAND_SPECIFIC, 0x09);
    FEATURE_NOT_SAVEABLE = (sct::COMMAND_SPECIFIC, 0x0D);
    FEATURE_NOT_CHANGEABLE = (sct::COMMAND_SPECIFIC, 0x0E);
    CONNECT_INCOMPATIBLE_FORMAT = (sct::COMMAND_SPECIFIC, 0x80);
    CONNECT_CONTROLLER_BUSY = (sct::COMMAND_SPECIFIC, 0x81);
    CONNECT_INVALID_PARAMETERS = (sct::COMMAND_SPECIFIC, 0x82);
    CONNECT_INVALID_HOST = (sct::COMMAND_SPECIFIC, 0x84);
    AUTHENTICATION_REQUIRED = (sct::COMMAND_SPECIFIC, 0x91);
    COMPARE_FAILURE = (sct::MEDIA, 0x85);
}

impl Status {
    const DNR: u16 = 1 << 14;

    pub const fn new(sct: u8, sc: u8) -> Self {
        Status(((sct as u16 & 0x7) << 8) | sc as u16)
    }

    /// Do Not Retry: the same command will fail again.
    pub const fn dnr(self) -> Self {
        Status(self.0 | Self::DNR)
    }

    /// The same status, retryable.
    pub const fn without_dnr(self) -> Self {
        Status(self.0 & !Self::DNR)
    }

    pub const fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }

    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    /// The CQE status field (bits 15:1 of DW3's upper half); phase is left 0, as fabrics use.
    pub const fn to_cqe_field(self) -> u16 {
        self.0 << 1
    }

    pub const fn from_cqe_field(v: u16) -> Self {
        Status(v >> 1)
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={:#x}, sc={:#04x}", self.sct(), self.sc())?;
        if self.0 & Self::DNR != 0 {
            write!(f, ", dnr")?;
        }
        write!(f, ")")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cqe_field_layout() {
        // Invalid field with DNR: SC 0x02, SCT 0, DNR bit 14, shifted past the phase bit.
        assert_eq!(Status::INVALID_FIELD.dnr().to_cqe_field(), 0x8004);
        assert_eq!(Status::CONNECT_INVALID_HOST.to_cqe_field(), (0x184) << 1);
        assert_eq!(Status::from_cqe_field(0x8004), Status::INVALID_FIELD.dnr());
        assert!(Status::SUCCESS.is_success());
        assert!(!Status::LBA_OUT_OF_RANGE.is_success());
        assert_eq!(Status::COMPARE_FAILURE.sct(), sct::MEDIA);
    }
}
