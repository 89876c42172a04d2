//! NVMe completion status (NVMe Base 2.0, Figure 101 and 102): a value, never an error type.

use std::fmt;

/// Status Code Type (SCT).
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

/// The status field of a CQE without the phase bit: SC in bits 7:0, SCT in 10:8, DNR in 14.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Status(u16);

macro_rules! codes {
    ($($name:ident = ($sct:expr, $sc:expr, $text:literal);)*) => {
        impl Status {
            $(pub const $name: Status = Status::new($sct, $sc);)*

            /// The specification's name of a status this target knows, as logs should show it.
            pub fn name(self) -> Option<&'static str> {
                let code = Status(self.0 & 0x7ff);
                $(if code == Status::$name {
                    return Some($text);
                })*
                None
            }
        }
    };
}

codes! {
    SUCCESS = (sct::GENERIC, 0x00, "Successful Completion");
    INVALID_OPCODE = (sct::GENERIC, 0x01, "Invalid Command Opcode");
    INVALID_FIELD = (sct::GENERIC, 0x02, "Invalid Field in Command");
    DATA_TRANSFER_ERROR = (sct::GENERIC, 0x04, "Data Transfer Error");
    INTERNAL_ERROR = (sct::GENERIC, 0x06, "Internal Error");
    ABORTED_BY_REQUEST = (sct::GENERIC, 0x07, "Command Abort Requested");
    INVALID_NAMESPACE = (sct::GENERIC, 0x0B, "Invalid Namespace or Format");
    COMMAND_SEQUENCE_ERROR = (sct::GENERIC, 0x0C, "Command Sequence Error");
    INVALID_SGL_DESCRIPTOR = (sct::GENERIC, 0x0D, "Invalid SGL Segment Descriptor");
    DATA_SGL_LENGTH_INVALID = (sct::GENERIC, 0x0F, "Data SGL Length Invalid");
    SGL_TYPE_INVALID = (sct::GENERIC, 0x11, "SGL Descriptor Type Invalid");
    SGL_OFFSET_INVALID = (sct::GENERIC, 0x16, "SGL Offset Invalid");
    HOST_ID_INCONSISTENT = (sct::GENERIC, 0x18, "Host Identifier Inconsistent Format");
    LBA_OUT_OF_RANGE = (sct::GENERIC, 0x80, "LBA Out of Range");
    CAPACITY_EXCEEDED = (sct::GENERIC, 0x81, "Capacity Exceeded");
    NAMESPACE_NOT_READY = (sct::GENERIC, 0x82, "Namespace Not Ready");
    RESERVATION_CONFLICT = (sct::GENERIC, 0x83, "Reservation Conflict");
    INVALID_QUEUE_ID = (sct::COMMAND_SPECIFIC, 0x01, "Invalid Queue Identifier");
    ASYNC_EVENT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x05, "Asynchronous Event Request Limit Exceeded");
    INVALID_LOG_PAGE = (sct::COMMAND_SPECIFIC, 0x09, "Invalid Log Page");
    FEATURE_NOT_SAVEABLE = (sct::COMMAND_SPECIFIC, 0x0D, "Feature Identifier Not Saveable");
    FEATURE_NOT_CHANGEABLE = (sct::COMMAND_SPECIFIC, 0x0E, "Feature Not Changeable");
    CONNECT_INCOMPATIBLE_FORMAT = (sct::COMMAND_SPECIFIC, 0x80, "Connect Incompatible Format");
    CONNECT_CONTROLLER_BUSY = (sct::COMMAND_SPECIFIC, 0x81, "Connect Controller Busy");
    CONNECT_INVALID_PARAMETERS = (sct::COMMAND_SPECIFIC, 0x82, "Connect Invalid Parameters");
    CONNECT_INVALID_HOST = (sct::COMMAND_SPECIFIC, 0x84, "Connect Invalid Host");
    AUTHENTICATION_REQUIRED = (sct::COMMAND_SPECIFIC, 0x91, "Authentication Required");
    WRITE_FAULT = (sct::MEDIA, 0x80, "Write Fault");
    UNRECOVERED_READ_ERROR = (sct::MEDIA, 0x81, "Unrecovered Read Error");
    COMPARE_FAILURE = (sct::MEDIA, 0x85, "Compare Failure");
    ANA_PERSISTENT_LOSS = (sct::PATH, 0x01, "Asymmetric Access Persistent Loss");
    ANA_INACCESSIBLE = (sct::PATH, 0x02, "Asymmetric Access Inaccessible");
    ANA_TRANSITION = (sct::PATH, 0x03, "Asymmetric Access Transition");
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

    /// What a device's completion said (its status field without the phase bit), as this
    /// target passes it on: SCT, SC and DNR kept; More and the retry delay dropped, since the
    /// target has no error log entry and reports no retry delay times of its own.
    pub const fn from_device(field: u16) -> Self {
        Status(field & (Self::DNR | 0x7ff))
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
    /// As the Linux host logs a status: "Unrecovered Read Error (sct 0x2 / sc 0x81) DNR".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sct {:#x} / sc {:#x})", self.name().unwrap_or("Unknown"), self.sct(), self.sc())?;
        if self.0 & Self::DNR != 0 {
            write!(f, " DNR")?;
        }
        Ok(())
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

    #[test]
    fn a_device_status_keeps_its_code_and_dnr_and_reads_as_the_host_logs_it() {
        // Unrecovered Read Error with More (bit 13), CRD 1 (bits 12:11) and DNR (bit 14).
        let s = Status::from_device(0x4000 | 0x2000 | 0x0800 | 0x281);
        assert_eq!(s, Status::UNRECOVERED_READ_ERROR.dnr());
        assert_eq!(s.to_string(), "Unrecovered Read Error (sct 0x2 / sc 0x81) DNR");
        assert_eq!(Status::WRITE_FAULT.to_string(), "Write Fault (sct 0x2 / sc 0x80)");
        assert_eq!(Status::new(7, 0xff).to_string(), "Unknown (sct 0x7 / sc 0xff)");
    }
}
