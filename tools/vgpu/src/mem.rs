//! Device memory. A device pointer is the address of a host allocation (256-byte aligned, as
//! cuMemAlloc guarantees), so copies and cuBLAS can use it directly; every kernel access is
//! checked against this table of live allocations first (memcheck).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// One live allocation.
#[derive(Debug, Clone, Copy)]
pub struct Alloc {
    pub base: u64,
    pub size: u64,
    /// Which device (ordinal) it belongs to.
    pub device: i32,
    /// Unique per allocation in the process (an address may be handed out again after a
    /// free; the id tells the two apart, e.g. for streamcheck's access history).
    pub id: u64,
}

const ALIGN: usize = 256;

fn table() -> MutexGuard<'static, BTreeMap<u64, Alloc>> {
    static T: Mutex<BTreeMap<u64, Alloc>> = Mutex::new(BTreeMap::new());
    T.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocates `size` bytes (at least 1) filled with a poison byte, so a kernel that reads what
/// nobody wrote sees garbage, as on a GPU. None when the host is out of memory.
pub fn alloc(size: u64, device: i32) -> Option<u64> {
    let layout = std::alloc::Layout::from_size_align(size.max(1) as usize, ALIGN).ok()?;
    // SAFETY: layout has non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: p points to size.max(1) writable bytes.
    unsafe { std::ptr::write_bytes(p, 0xA5, size.max(1) as usize) };
    let base = p as u64;
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    table().insert(base, Alloc { base, size, device, id });
    Some(base)
}

/// Frees an allocation by its base address; false if `base` is not the start of a live one.
pub fn free(base: u64) -> bool {
    let Some(a) = table().remove(&base) else { return false };
    let layout = std::alloc::Layout::from_size_align(a.size.max(1) as usize, ALIGN).expect("layout");
    // SAFETY: allocated by `alloc` with this layout.
    unsafe { std::alloc::dealloc(base as *mut u8, layout) };
    true
}

/// The live allocation holding `[addr, addr + len)`, if one does wholly.
pub fn find(addr: u64, len: u64) -> Option<Alloc> {
    let t = table();
    let (_, a) = t.range(..=addr).next_back()?;
    (addr >= a.base && addr.checked_add(len)? <= a.base + a.size).then_some(*a)
}

/// A copy of the table, sorted by base, for a launch's fast lookups.
pub fn snapshot() -> Vec<Alloc> {
    table().values().copied().collect()
}

/// Bytes currently allocated.
pub fn used() -> u64 {
    table().values().map(|a| a.size).sum()
}
