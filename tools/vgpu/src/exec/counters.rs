//! Per-launch counters (`VGPU_COUNTERS=1`): warp instructions by class, mma count, global
//! bytes and 32-byte sectors per request, shared-memory wavefronts and bank conflicts,
//! barriers. A proxy computed by the interpreter, not a GPU measurement: no timing, and
//! ptxas may schedule, fuse or remove instructions the PTX shows.

use super::decode::Space;

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub classes: Vec<String>,
    pub warp_insts: Vec<u64>,
    pub lane_insts: Vec<u64>,
    pub mma: u64,
    pub gld_bytes: u64,
    pub gst_bytes: u64,
    pub g_requests: u64,
    pub g_sectors: u64,
    pub s_requests: u64,
    pub s_wavefronts: u64,
    pub s_ideal: u64,
    pub barriers: u64,
    pub barrier_arrivals: u64,
    pub atomics: u64,
    pub cp_async_bytes: u64,
}

impl Counters {
    pub fn new(classes: &[String]) -> Self {
        Counters {
            classes: classes.to_vec(),
            warp_insts: vec![0; classes.len()],
            lane_insts: vec![0; classes.len()],
            ..Default::default()
        }
    }

    #[inline(always)]
    pub fn count(&mut self, class: u16, lanes: u32) {
        self.warp_insts[class as usize] += 1;
        self.lane_insts[class as usize] += lanes as u64;
    }

    /// One warp-wide memory request: (address, bytes) per participating lane.
    pub fn request(&mut self, space: Space, addrs: &[(u64, u32)]) {
        if addrs.is_empty() {
            return;
        }
        match space {
            Space::Global | Space::Const => {
                let mut sectors: Vec<u64> = Vec::with_capacity(addrs.len() * 2);
                for &(a, n) in addrs {
                    let n = n.max(1) as u64;
                    for s in a / 32..=(a + n - 1) / 32 {
                        sectors.push(s);
                    }
                }
                sectors.sort_unstable();
                sectors.dedup();
                self.g_requests += 1;
                self.g_sectors += sectors.len() as u64;
            }
            Space::Shared => {
                // Lanes are served in phases of 128 bytes; within a phase, a bank (4-byte
                // word address mod 32) that holds k distinct words needs k wavefronts.
                let width = addrs[0].1.max(4) as usize;
                let per_phase = (128 / width).max(1);
                for phase in addrs.chunks(per_phase) {
                    let mut words: Vec<u64> = Vec::with_capacity(phase.len() * 4);
                    for &(a, n) in phase {
                        for wd in a / 4..=(a + n.max(1) as u64 - 1) / 4 {
                            words.push(wd);
                        }
                    }
                    words.sort_unstable();
                    words.dedup();
                    let mut per_bank = [0u32; 32];
                    for wd in words {
                        per_bank[(wd % 32) as usize] += 1;
                    }
                    self.s_wavefronts += *per_bank.iter().max().unwrap_or(&1) as u64;
                    self.s_ideal += 1;
                }
                self.s_requests += 1;
            }
            _ => {}
        }
    }

    pub fn merge(&mut self, o: &Counters) {
        for i in 0..self.warp_insts.len() {
            self.warp_insts[i] += o.warp_insts[i];
            self.lane_insts[i] += o.lane_insts[i];
        }
        self.mma += o.mma;
        self.gld_bytes += o.gld_bytes;
        self.gst_bytes += o.gst_bytes;
        self.g_requests += o.g_requests;
        self.g_sectors += o.g_sectors;
        self.s_requests += o.s_requests;
        self.s_wavefronts += o.s_wavefronts;
        self.s_ideal += o.s_ideal;
        self.barriers += o.barriers;
        self.barrier_arrivals += o.barrier_arrivals;
        self.atomics += o.atomics;
        self.cp_async_bytes += o.cp_async_bytes;
    }

    /// The printed table.
    pub fn table(&self, kernel: &str, grid: [u32; 3], block: [u32; 3]) -> String {
        let total: u64 = self.warp_insts.iter().sum();
        let lanes: u64 = self.lane_insts.iter().sum();
        let mut s = format!(
            "vgpu counters (interpreter proxy, not GPU performance): {kernel} grid ({},{},{}) block ({},{},{})\n",
            grid[0], grid[1], grid[2], block[0], block[1], block[2]
        );
        s.push_str(&format!(
            "  warp instructions {total}, thread instructions {lanes} (lane utilisation {:.1}%)\n",
            100.0 * lanes as f64 / (32 * total.max(1)) as f64
        ));
        s.push_str(&format!(
            "  mma.m16n8k16 {}, barriers {}, global atomics {}\n",
            self.mma, self.barriers, self.atomics
        ));
        s.push_str(&format!(
            "  global: {} B loaded, {} B stored, {} requests, {:.2} sectors/request; cp.async {} B\n",
            self.gld_bytes,
            self.gst_bytes,
            self.g_requests,
            self.g_sectors as f64 / self.g_requests.max(1) as f64,
            self.cp_async_bytes
        ));
        s.push_str(&format!(
            "  shared: {} requests, {} wavefronts for {} ideal ({} bank-conflict wavefronts)\n",
            self.s_requests,
            self.s_wavefronts,
            self.s_ideal,
            self.s_wavefronts - self.s_ideal
        ));
        let mut rows: Vec<(usize, u64)> = self.warp_insts.iter().copied().enumerate().filter(|&(_, n)| n > 0).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        s.push_str("  by class (warp instructions):\n");
        for (i, n) in rows {
            s.push_str(&format!(
                "    {:<32} {:>12}  {:5.1}%\n",
                self.classes[i],
                n,
                100.0 * n as f64 / total.max(1) as f64
            ));
        }
        s
    }
}
