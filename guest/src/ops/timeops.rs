//! Guest clocks: read REALTIME/MONOTONIC/BOOTTIME, set REALTIME, write the RTC.

use qx_proto::agent::{ErrorCode, TimeInfo, TimeSetReply, TimeSetRequest};

use super::{OpError, OpResult};

pub fn get() -> OpResult<TimeInfo> {
    Err(OpError::new(
        ErrorCode::Unsupported,
        "time get is not implemented yet",
    ))
}

pub fn set(req: &TimeSetRequest) -> OpResult<TimeSetReply> {
    let _ = req;
    Err(OpError::new(
        ErrorCode::Unsupported,
        "time set is not implemented yet",
    ))
}
