//! cloud-init NoCloud seed images, built in Rust.
//!
//! An ISO 9660 image labelled `cidata` holding `meta-data`, `user-data` and optionally
//! `network-config`, with a Joliet tree so Linux sees those exact lower-case names (the primary
//! tree carries 8.3 names as the standard requires). The output is deterministic: the same input
//! gives the same bytes, so a seed volume can be compared with what it should hold.

const SECTOR: usize = 2048;
const LABEL: &str = "cidata";

/// Files of a seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    /// `instance-id` and `local-hostname` lines (YAML).
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

impl Seed {
    /// meta-data for an instance; the id changes when the VM object is recreated (its UID),
    /// which makes cloud-init run again on a new VM but not on a restart.
    pub fn new(
        instance_id: &str,
        hostname: &str,
        user_data: &str,
        network_config: Option<&str>,
    ) -> Self {
        // quote as YAML strings: names cannot break out of their value
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        Seed {
            meta_data: format!(
                "instance-id: {}\nlocal-hostname: {}\n",
                q(instance_id),
                q(hostname)
            ),
            user_data: user_data.to_string(),
            network_config: network_config.map(str::to_string),
        }
    }

    fn files(&self) -> Vec<(&'static str, &'static str, &[u8])> {
        // (Joliet name, ISO 9660 level-1 name, content), sorted by Joliet name
        let mut f: Vec<(&'static str, &'static str, &[u8])> = vec![
            ("meta-data", "META_DAT.;1", self.meta_data.as_bytes()),
            ("user-data", "USER_DAT.;1", self.user_data.as_bytes()),
        ];
        if let Some(n) = &self.network_config {
            f.push(("network-config", "NETWORK_.;1", n.as_bytes()));
        }
        f.sort_by_key(|(j, _, _)| *j);
        f
    }

    /// The ISO image.
    pub fn to_iso(&self) -> Vec<u8> {
        let files = self.files();
        // sector layout
        const PVD: usize = 16;
        const SVD: usize = 17;
        const TERM: usize = 18;
        const PATH_L: usize = 19;
        const PATH_M: usize = 20;
        const JPATH_L: usize = 21;
        const JPATH_M: usize = 22;
        const ROOT: usize = 23;
        const JROOT: usize = 24;
        let mut next = 25;
        let mut extents = Vec::new();
        for (_, _, data) in &files {
            extents.push(next);
            next += data.len().div_ceil(SECTOR).max(1);
        }
        let total = next;
        let mut img = vec![0u8; total * SECTOR];

        let primary_root = dir(ROOT, &files, &extents, |(_, iso, _)| {
            iso.as_bytes().to_vec()
        });
        let joliet_root = dir(JROOT, &files, &extents, |(j, _, _)| ucs2(j));
        put(&mut img, ROOT * SECTOR, &primary_root);
        put(&mut img, JROOT * SECTOR, &joliet_root);
        for ((_, _, data), at) in files.iter().zip(&extents) {
            put(&mut img, at * SECTOR, data);
        }
        for (l, m, root) in [(PATH_L, PATH_M, ROOT), (JPATH_L, JPATH_M, JROOT)] {
            put(&mut img, l * SECTOR, &path_table(root, false));
            put(&mut img, m * SECTOR, &path_table(root, true));
        }
        let root_rec = |at: usize| record(at, SECTOR, true, &[0]);
        let pvd = descriptor(1, total, PATH_L, PATH_M, &root_rec(ROOT), |s, w| {
            pad_ascii(s, w)
        });
        let svd = descriptor(2, total, JPATH_L, JPATH_M, &root_rec(JROOT), pad_ucs2);
        put(&mut img, PVD * SECTOR, &pvd);
        put(&mut img, SVD * SECTOR, &svd);
        let mut term = vec![0u8; 7];
        term[0] = 255;
        term[1..6].copy_from_slice(b"CD001");
        term[6] = 1;
        put(&mut img, TERM * SECTOR, &term);
        img
    }
}

fn put(img: &mut [u8], at: usize, data: &[u8]) {
    if let Some(dst) = img.get_mut(at..at + data.len()) {
        dst.copy_from_slice(data);
    }
}

fn both16(v: u16) -> [u8; 4] {
    let l = v.to_le_bytes();
    let b = v.to_be_bytes();
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let l = v.to_le_bytes();
    let b = v.to_be_bytes();
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

fn u32_of(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_be_bytes()).collect()
}

fn pad_ascii(s: &str, width: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(width).collect();
    v.resize(width, b' ');
    v
}

fn pad_ucs2(s: &str, width: usize) -> Vec<u8> {
    let mut v = ucs2(s);
    v.truncate(width - width % 2);
    while v.len() + 1 < width {
        v.extend_from_slice(&[0, b' ']);
    }
    v.resize(width, 0);
    v
}

/// A directory record (ECMA-119 9.1). Dates are fixed (1970-01-01) for deterministic output.
fn record(extent: usize, len: usize, is_dir: bool, ident: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(u32_of(extent)));
    r[10..18].copy_from_slice(&both32(u32_of(len)));
    r[18] = 70; // years since 1900
    r[19] = 1;
    r[20] = 1;
    r[25] = if is_dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = u8::try_from(ident.len()).unwrap_or(u8::MAX);
    r.extend_from_slice(ident);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = u8::try_from(r.len()).unwrap_or(u8::MAX);
    r
}

type FileEntry<'a> = (&'static str, &'static str, &'a [u8]);

fn dir(
    self_at: usize,
    files: &[FileEntry<'_>],
    extents: &[usize],
    name: impl Fn(&FileEntry<'_>) -> Vec<u8>,
) -> Vec<u8> {
    let mut d = record(self_at, SECTOR, true, &[0]);
    d.extend(record(self_at, SECTOR, true, &[1]));
    for (f, at) in files.iter().zip(extents) {
        d.extend(record(*at, f.2.len(), false, &name(f)));
    }
    d
}

fn path_table(root: usize, big_endian: bool) -> Vec<u8> {
    let mut p = vec![1u8, 0];
    let at = u32_of(root);
    p.extend_from_slice(&if big_endian {
        at.to_be_bytes()
    } else {
        at.to_le_bytes()
    });
    p.extend_from_slice(&if big_endian {
        1u16.to_be_bytes()
    } else {
        1u16.to_le_bytes()
    });
    p.extend_from_slice(&[0, 0]);
    p
}

/// A primary (1) or Joliet supplementary (2) volume descriptor.
fn descriptor(
    kind: u8,
    total: usize,
    path_l: usize,
    path_m: usize,
    root: &[u8],
    text: impl Fn(&str, usize) -> Vec<u8>,
) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = kind;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[8..40].copy_from_slice(&text("LINUX", 32));
    d[40..72].copy_from_slice(&text(LABEL, 32));
    d[80..88].copy_from_slice(&both32(u32_of(total)));
    if kind == 2 {
        d[88..91].copy_from_slice(b"%/E"); // Joliet UCS-2 level 3
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(2048));
    d[132..140].copy_from_slice(&both32(10));
    d[140..144].copy_from_slice(&u32_of(path_l).to_le_bytes());
    d[148..152].copy_from_slice(&u32_of(path_m).to_be_bytes());
    d[156..156 + root.len()].copy_from_slice(root);
    for (from, width) in [
        (190, 128),
        (318, 128),
        (446, 128),
        (574, 128),
        (702, 37),
        (739, 37),
        (776, 37),
    ] {
        d[from..from + width].copy_from_slice(&text("", width));
    }
    d[574..702].copy_from_slice(&text("KVM-OPERATOR", 128));
    for at in [813, 830, 847, 864] {
        d[at..at + 16].copy_from_slice(b"0000000000000000");
    }
    d[881] = 1;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sector_aligned() {
        let s = Seed::new("uid-1", "web-1", "#cloud-config\n", Some("version: 2\n"));
        let a = s.to_iso();
        assert_eq!(a, s.to_iso());
        assert_eq!(a.len() % SECTOR, 0);
        assert_eq!(&a[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(&a[17 * SECTOR + 88..17 * SECTOR + 91], b"%/E");
    }

    #[test]
    fn meta_data_values_cannot_break_out() {
        let s = Seed::new("a\nuser-data: x", "h\"ost", "", None);
        assert_eq!(s.meta_data.lines().count(), 2, "{}", s.meta_data);
        let parsed: serde_json::Value = serde_saphyr::from_str(&s.meta_data).unwrap_or_default();
        assert_eq!(parsed["instance-id"], "a\nuser-data: x");
        assert_eq!(parsed["local-hostname"], "h\"ost");
    }

    #[test]
    fn large_user_data_spans_sectors() {
        let big = "x".repeat(3 * SECTOR + 5);
        let iso = Seed::new("i", "h", &big, None).to_iso();
        let hay = iso.windows(big.len()).any(|w| w == big.as_bytes());
        assert!(hay, "user-data is stored contiguously");
    }
}
