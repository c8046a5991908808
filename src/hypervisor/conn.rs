//! The one owner of a libvirt connection.
//!
//! `Libvirt` holds the connection, opens it on first use and reopens it after libvirtd
//! restarts. Work runs as closures on the blocking pool (`exec::blocking`), a few at a time,
//! each closure doing its libvirt calls and checking their errors on one thread (libvirt keeps
//! errors per thread). libvirt connections are thread-safe, so calls on different domains run
//! in parallel; `DomainLocks` serializes the changes to one domain.
//!
//! A call's permit and a domain's lock are moved into the blocking closure, so they are held
//! until the libvirt call returns even when the RPC that started it is cancelled (its future
//! dropped): a cancelled caller never lets another call past while its own still runs.
//!
//! The libvirt default event loop runs on its own thread: it notices a closed connection at
//! once (so the next call reopens instead of failing), keeps the connection alive, and delivers
//! DEVICE_REMOVED events that wake detach waiters.

use crate::error::{Error, Kind, Result};
use crate::exec;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Once};
use tokio::sync::{Notify, OwnedMutexGuard, Semaphore};
use tonic::Code;
use virt::connect::Connect;
use virt::sys;

/// libvirtd serves 5 concurrent calls per client by default (`max_client_requests`).
const MAX_CONCURRENT_CALLS: usize = 4;

/// Woken by every DEVICE_REMOVED event of any domain: waiters re-read their domain.
static DEVICE_REMOVED: LazyLock<Notify> = LazyLock::new(Notify::new);

/// A future that completes at the next DEVICE_REMOVED event. Create it before checking
/// the domain, so an event between the check and the wait is not missed.
pub fn device_removed() -> tokio::sync::futures::Notified<'static> {
    DEVICE_REMOVED.notified()
}

/// Registers libvirt's default event loop and runs it on a thread, once per process. Must
/// happen before the first connection opens.
fn start_event_loop() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // libvirt prints every error to stderr by default; ours are returned and logged.
        virt::error::clear_error_callback();
        // SAFETY: plain libvirt calls without pointers; registration happens once, before
        // any connection exists.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            tracing::warn!("libvirt event loop unavailable: broken connections are noticed on use");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: runs one iteration of the registered default loop.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event thread");
        }
    });
}

unsafe extern "C" fn on_device_removed(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    _alias: *const std::os::raw::c_char,
    _opaque: *mut std::os::raw::c_void,
) {
    DEVICE_REMOVED.notify_waiters();
}

/// Subscribes a fresh connection to DEVICE_REMOVED of every domain (best effort: detach
/// also polls).
fn subscribe_device_removed(conn: &Connect) {
    type DeviceRemoved = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const std::os::raw::c_char,
        *mut std::os::raw::c_void,
    );
    type Generic =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut std::os::raw::c_void);
    // SAFETY: libvirt calls the callback with the DEVICE_REMOVED signature (the C API casts
    // every event callback to the generic type, VIR_DOMAIN_EVENT_CALLBACK); the opaque pointer
    // is unused and the callback only touches a static.
    let rc = unsafe {
        let cb = std::mem::transmute::<DeviceRemoved, Generic>(on_device_removed);
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED as i32,
            Some(cb),
            std::ptr::null_mut(),
            None,
        )
    };
    if rc < 0 {
        let e = virt::error::Error::last_error();
        tracing::debug!(error = %e, "no DEVICE_REMOVED events; detach confirmation polls");
    }
}

/// The error of a failed libvirt call: `what` was being done on the connection to `uri` of
/// hypervisor host `host`.
pub(crate) fn classify(what: &str, host: &str, uri: &str, e: &virt::error::Error) -> Error {
    let (code, domain, message) = (e.code().to_raw(), e.domain().to_raw(), e.message());
    Error::Libvirt {
        op: what.to_string(),
        host: host.to_string(),
        uri: uri.to_string(),
        code: code as i32,
        domain: domain as i32,
        kind: libvirt_kind(code, domain, message),
        message: message.to_string(),
    }
}

/// What a libvirt error means, decided once, here: from its code and domain, except where
/// libvirt has no code for it (see below).
fn libvirt_kind(code: sys::virErrorNumber, domain: sys::virErrorDomain, message: &str) -> Kind {
    // The connection itself is gone (libvirtd stopped or restarted): every failure of the
    // RPC layer (socket closed, EOF, cannot connect) has domain VIR_FROM_RPC.
    if domain == sys::VIR_FROM_RPC
        || matches!(
            code,
            sys::VIR_ERR_NO_CONNECT | sys::VIR_ERR_INVALID_CONN | sys::VIR_ERR_RPC
        )
    {
        return Kind::Unreachable;
    }
    match code {
        sys::VIR_ERR_NO_DOMAIN => Kind::NotFound,
        sys::VIR_ERR_OPERATION_INVALID => Kind::InvalidState,
        sys::VIR_ERR_OPERATION_TIMEOUT => Kind::Timeout,
        // libvirt reports these as VIR_ERR_INTERNAL_ERROR / OPERATION_FAILED with no code of
        // their own, so only the words tell. Both are fixed English: "No more available PCI
        // slots" is libvirt's, relayed from libvirtd; "in the process of unplug" is QEMU's
        // device_del answer, and QEMU has no translations. A libvirtd running in another
        // language makes the first one INTERNAL (its message says why), never a wrong code.
        _ if message.contains("No more available PCI slots") => Kind::NoPciSlot,
        _ if message.contains("process of unplug") || message.contains("in progress") => {
            Kind::UnplugPending
        }
        _ => Kind::Other,
    }
}

struct Inner {
    host: String,
    uri: String,
    slot: Mutex<Option<Connect>>,
    permits: Arc<Semaphore>,
}

/// A shared handle on one libvirt connection (cheap to clone).
#[derive(Clone)]
pub struct Libvirt {
    inner: Arc<Inner>,
}

impl Libvirt {
    /// Does not connect yet: the first call does, so the plugin starts while libvirtd is down.
    /// The connection of the one implicit host (`config::IMPLICIT_HOST`).
    pub fn new(uri: &str) -> Libvirt {
        Self::for_host(crate::config::IMPLICIT_HOST, uri)
    }

    /// The connection to hypervisor host `host` at `uri` (not opened yet). Each host has its
    /// own connection, reconnection and call permits: one host going down never holds up
    /// calls to another.
    pub fn for_host(host: &str, uri: &str) -> Libvirt {
        Self::with_permits(host, uri, MAX_CONCURRENT_CALLS)
    }

    fn with_permits(host: &str, uri: &str, permits: usize) -> Libvirt {
        start_event_loop();
        Libvirt {
            inner: Arc::new(Inner {
                host: host.to_string(),
                uri: uri.to_string(),
                slot: Mutex::new(None),
                permits: Arc::new(Semaphore::new(permits)),
            }),
        }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// The name of the host this connection reaches.
    pub(crate) fn host(&self) -> &str {
        &self.inner.host
    }

    /// Bounds `call`, a call to this host's libvirt, by `limit`: after it, UNAVAILABLE naming
    /// the host (the call itself keeps running on its own permit).
    pub(crate) async fn bounded<T>(
        &self,
        limit: std::time::Duration,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "libvirt of host {} at {} did not answer within {}s",
                self.host(),
                self.uri(),
                limit.as_secs()
            )))
        })
    }

    /// Runs `f` with the connection on a blocking thread, (re)connecting first if needed.
    /// `f` maps libvirt errors with [`Libvirt::error`]; when the connection turns out to be
    /// dead, it is dropped so the next call reconnects, and `f` is retried once if
    /// `retry_on_reconnect` (reads only: a change may have happened before the break).
    async fn run<T, F>(&self, retry_on_reconnect: bool, f: F) -> Result<T>
    where
        F: Fn(&Connect, &Libvirt) -> Result<T> + Send + Sync + 'static,
        T: Send + 'static,
    {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("libvirt call gate closed"))?;
        let this = self.clone();
        let result = exec::blocking(move || {
            // Held until the calls end, even if the caller gives up first.
            let _permit = permit;
            let conn = this.connection()?;
            match f(&conn, &this) {
                Err(e) if e.code() == Code::Unavailable && !this.alive(&conn) => {
                    this.forget(&conn);
                    if !retry_on_reconnect {
                        return Err(e);
                    }
                    tracing::info!(host = %this.host(), uri = %this.uri(),
                        "libvirt connection was lost; reconnecting");
                    let conn = this.connection()?;
                    f(&conn, &this)
                }
                other => other,
            }
        })
        .await;
        let up = !matches!(&result, Err(e) if e.kind() == Some(Kind::Unreachable));
        crate::metrics::set_host_up(self.host(), up);
        result
    }

    /// Runs a read-only `f` (retried once on a fresh connection if the old one had died).
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: Fn(&Connect, &Libvirt) -> Result<T> + Send + Sync + 'static,
        T: Send + 'static,
    {
        self.run(true, f).await
    }

    /// Runs an `f` that changes something (never retried: the caller re-reads the state).
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connect, &Libvirt) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let once = Mutex::new(Some(f));
        self.run(false, move |c, l| {
            let f = once
                .lock()
                .map_err(|_| Error::internal("libvirt call state poisoned"))?
                .take()
                .ok_or_else(|| Error::internal("libvirt change ran twice"))?;
            f(c, l)
        })
        .await
    }

    /// Maps a libvirt error of the current thread's last call.
    pub(crate) fn error(&self, what: &str, e: virt::error::Error) -> Error {
        classify(what, self.host(), self.uri(), &e)
    }

    /// Readiness: libvirtd answers a call.
    pub async fn ping(&self) -> Result<()> {
        self.read(|c, l| {
            c.lib_version()
                .map(drop)
                .map_err(|e| l.error("pinging libvirt", e))
        })
        .await
    }

    fn alive(&self, conn: &Connect) -> bool {
        matches!(conn.is_alive(), Ok(true))
    }

    /// The open connection, opened now if there is none or the old one died.
    fn connection(&self) -> Result<Connect> {
        let mut slot = self
            .inner
            .slot
            .lock()
            .map_err(|_| Error::internal("libvirt connection lock poisoned"))?;
        if let Some(conn) = slot.as_ref() {
            if self.alive(conn) {
                return Ok(conn.clone());
            }
            tracing::info!(host = %self.host(), uri = %self.uri(),
                "libvirt connection closed; reconnecting");
            *slot = None;
        }
        let conn = Connect::open(Some(self.uri())).map_err(|e| {
            let mut err = classify("connecting", self.host(), self.uri(), &e);
            // Whatever libvirt says, a connection that cannot open is an unreachable libvirt.
            if let Error::Libvirt { kind, .. } = &mut err {
                *kind = Kind::Unreachable;
            }
            err
        })?;
        subscribe_device_removed(&conn);
        tracing::info!(host = %self.host(), uri = %self.uri(), "connected to libvirt");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Drops `conn` from the slot if it is still the current one.
    fn forget(&self, conn: &Connect) {
        if let Ok(mut slot) = self.inner.slot.lock() {
            // SAFETY: pointer comparison only.
            let same = slot
                .as_ref()
                .is_some_and(|c| unsafe { c.as_ptr() == conn.as_ptr() });
            if same {
                *slot = None;
            }
        }
    }
}

/// Serializes the changes to one domain (by UUID, whichever host it runs on, so a domain that
/// migrates keeps one lock); different domains proceed in parallel.
#[derive(Default, Clone)]
pub(crate) struct DomainLocks {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// A held domain lock. Every blocking closure of the change takes a clone, so the lock is
/// released only once the caller is done *and* no libvirt call of the change still runs.
pub(crate) type DomainLock = Arc<OwnedMutexGuard<()>>;

impl DomainLocks {
    /// Waits for the domain (by UUID) to be free and holds it until every clone of the guard
    /// drops.
    pub(crate) async fn lock(&self, uuid: &str) -> DomainLock {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Forget locks nobody holds or waits for, so the map stays as small as the set
            // of domains being changed.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(uuid.to_string()).or_default().clone()
        };
        Arc::new(lock.lock_owned().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn domain_locks_serialize_one_domain_only() {
        let locks = DomainLocks::default();
        let a = locks.lock("a").await;
        // Another domain is free while `a` is held.
        let b = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock("b")).await;
        assert!(b.is_ok());
        // The same domain waits.
        let again =
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock("a")).await;
        assert!(again.is_err());
        drop(a);
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock("a")).await;
        assert!(again.is_ok());
    }

    #[tokio::test]
    async fn unreachable_libvirt_is_unavailable() {
        let lv = Libvirt::new("qemu+unix:///system?socket=/nonexistent/libvirt-sock");
        let err = lv.ping().await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.to_string().contains("libvirtd"), "{err}");
    }

    /// A closure that sleeps `ms` like a slow libvirt call, then notes that it ended.
    fn slow(ms: u64, ended: &Arc<std::sync::atomic::AtomicBool>) -> impl Fn() + Send + Sync {
        let ended = ended.clone();
        move || {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Issue 17 defect 6: a caller that gives up (an RPC cancelled: its future dropped) while
    /// its libvirt call runs does not free the call's permit; the next call starts only once
    /// the first call has returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_call_keeps_its_permit_until_the_call_returns() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let lv = Libvirt::with_permits("t", "test:///default", 1);
        let ended = Arc::new(AtomicBool::new(false));
        let call = slow(400, &ended);
        let first = lv.read(move |_, _| {
            call();
            Ok(())
        });
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(100), first).await;
        assert!(
            gave_up.is_err(),
            "the first call is still running when cancelled"
        );
        let first_ended_before_second_started = lv
            .read({
                let ended = ended.clone();
                move |_, _| Ok(ended.load(Ordering::SeqCst))
            })
            .await
            .unwrap();
        assert!(first_ended_before_second_started);
    }

    /// Issue 17 defect 6: the domain lock moved into a change's blocking closure is held until
    /// the closure returns, even when the caller gave up meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_change_keeps_the_domain_locked_until_its_call_returns() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let lv = Libvirt::with_permits("t", "test:///default", 4);
        let locks = DomainLocks::default();
        let ended = Arc::new(AtomicBool::new(false));
        let guard = locks.lock("u").await;
        let call = slow(400, &ended);
        let change = lv.write(move |_, _| {
            let _held = guard;
            call();
            Ok(())
        });
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(100), change).await;
        assert!(
            gave_up.is_err(),
            "the change is still running when cancelled"
        );
        assert!(!ended.load(Ordering::SeqCst));
        let _next = locks.lock("u").await;
        assert!(
            ended.load(Ordering::SeqCst),
            "the next change got the domain before the cancelled one's call returned"
        );
    }
}
