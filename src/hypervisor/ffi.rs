//! The two libvirt calls the `virt` crate does not wrap safely: setting a disk's I/O limits
//! (typed parameters) and reading a disk's capacity (its wrapper ignores errors).

use super::diskxml::qos_fields;
use crate::params::Qos;
use std::ffi::CString;
use std::os::raw::c_int;
use virt::domain::Domain;
use virt::error::Error as VirtError;
use virt::sys;

fn cstring(s: &str) -> Result<CString, VirtError> {
    CString::new(s).map_err(VirtError::from)
}

/// virDomainSetBlockIoTune with all six limits (0 = unlimited), so earlier limits that `qos`
/// leaves out are cleared.
pub(super) fn set_block_iotune(
    dom: &Domain,
    disk: &str,
    qos: &Qos,
    flags: u32,
) -> Result<(), VirtError> {
    let disk = cstring(disk)?;
    let names: Vec<(CString, u64)> = qos_fields(qos)
        .iter()
        .map(|(name, v)| Ok((cstring(name)?, v.unwrap_or(0))))
        .collect::<Result<_, VirtError>>()?;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut nparams: c_int = 0;
    let mut maxparams: c_int = 0;
    // SAFETY: the typed-parameter array is built and freed by libvirt's own helpers; the
    // name and disk strings outlive the calls; the error is read on this thread right after
    // the failing call.
    unsafe {
        for (name, value) in &names {
            if sys::virTypedParamsAddULLong(
                &mut params,
                &mut nparams,
                &mut maxparams,
                name.as_ptr(),
                *value,
            ) < 0
            {
                let e = VirtError::last_error();
                sys::virTypedParamsFree(params, nparams);
                return Err(e);
            }
        }
        let rc = sys::virDomainSetBlockIoTune(dom.as_ptr(), disk.as_ptr(), params, nparams, flags);
        let result = if rc < 0 {
            Err(VirtError::last_error())
        } else {
            Ok(())
        };
        sys::virTypedParamsFree(params, nparams);
        result
    }
}

/// The size in bytes the domain sees for `disk` (virDomainGetBlockInfo capacity).
pub(super) fn block_capacity(dom: &Domain, disk: &str) -> Result<u64, VirtError> {
    let disk = cstring(disk)?;
    let mut info = std::mem::MaybeUninit::<sys::virDomainBlockInfo>::zeroed();
    // SAFETY: `info` is a plain C struct libvirt fills in; read only on success.
    unsafe {
        if sys::virDomainGetBlockInfo(dom.as_ptr(), disk.as_ptr(), info.as_mut_ptr(), 0) < 0 {
            return Err(VirtError::last_error());
        }
        Ok(info.assume_init().capacity)
    }
}
