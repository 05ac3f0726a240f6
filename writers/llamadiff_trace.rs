//! llamadiff_trace.rs - drop-in writer of the llamadiff trace format, version 1
//! (spec: docs/trace-format.md). One file, std only: copy it into your crate (`mod llamadiff_trace;`)
//! or compile it with rustc next to your code.
//!
//! ```ignore
//! let mut t = Trace::new("my-run", n_layer, &tokens, n_prompt, "my-engine")?;
//! t.add_f32(0, "blk.0.q", &[n_prompt, n_head, head_dim], &q)?;     // data is copied
//! t.close()?;                                                       // atomic: tmp folder + rename
//! ```
//!
//! Tensors are kept in memory until `close`, which writes `step-NNNN.safetensors` per step and
//! `manifest.json` (last) into a hidden temporary folder next to the target, then renames it into
//! place. On error `close` returns `Err`, removes the temporary folder and leaves the target
//! untouched. F16/BF16 data is given as raw `u16` bits (`f32_to_f16` / `f32_to_bf16` convert).
#![allow(dead_code)]

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn tag(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
    fn size(self) -> usize {
        if self == DType::F32 { 4 } else { 2 }
    }
}

struct Tensor {
    step: usize,
    site: String,
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
}

pub struct Trace {
    out_dir: PathBuf,
    n_layer: usize,
    tokens: Vec<i64>,
    n_prompt: usize,
    engine: String,
    dims: Vec<(String, usize)>,
    tensors: Vec<Tensor>,
}

fn err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Trace {
    /// `tokens`: the prompt then the decode inputs (n_prompt + steps ids).
    pub fn new<P: AsRef<Path>>(out_dir: P, n_layer: usize, tokens: &[i64], n_prompt: usize,
                               engine: &str) -> io::Result<Trace> {
        let out_dir = out_dir.as_ref().to_path_buf();
        if n_layer < 1 || n_prompt < 1 || n_prompt > tokens.len() {
            return Err(err("need n_layer >= 1 and 1 <= n_prompt <= tokens.len()".into()));
        }
        if out_dir.exists() {
            return Err(err(format!("{} already exists", out_dir.display())));
        }
        Ok(Trace { out_dir, n_layer, tokens: tokens.to_vec(), n_prompt, engine: engine.into(),
                   dims: Vec::new(), tensors: Vec::new() })
    }

    /// Optional: state a layout dim ("D", "F", "H", "Hkv", "Dh", "V") in the manifest's "dims".
    /// The reader checks the tensors against them, and with H/Hkv and Dh it accepts projections
    /// stored flat as (T, n_head * head_dim) for the (T, H, Dh) sites.
    pub fn set_dim(&mut self, name: &str, value: usize) -> io::Result<()> {
        if !["D", "F", "H", "Hkv", "Dh", "V"].contains(&name) || value < 1 {
            return Err(err(format!("bad dim {} = {}", name, value)));
        }
        self.dims.retain(|(n, _)| n != name);
        self.dims.push((name.into(), value));
        Ok(())
    }

    /// Set token `i` (a decode input picked while running: open with placeholders, set each pick).
    pub fn set_token(&mut self, i: usize, token: i64) -> io::Result<()> {
        if i >= self.tokens.len() || token < 0 {
            return Err(err(format!("token {} at index {} out of range (0..{})", token, i, self.tokens.len() - 1)));
        }
        self.tokens[i] = token;
        Ok(())
    }

    fn steps(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }

    /// Add raw little-endian bytes of `dtype`, row-major in `shape`.
    pub fn add(&mut self, step: usize, site: &str, shape: &[usize], dtype: DType, data: &[u8])
               -> io::Result<()> {
        if step > self.steps() {
            return Err(err(format!("step {} out of range 0..{}", step, self.steps())));
        }
        let ok_chars = !site.is_empty()
            && site.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
        let ok_layer = match site.strip_prefix("blk.") {
            Some(rest) => rest.split('.').next().and_then(|l| l.parse::<usize>().ok())
                .map_or(false, |l| l < self.n_layer),
            None => true,
        };
        if !ok_chars || !ok_layer {
            return Err(err(format!("{}/{}: invalid site name or layer", step, site)));
        }
        let count: usize = shape.iter().product();
        if shape.is_empty() || count == 0 || data.len() != count * dtype.size() {
            return Err(err(format!("{}/{}: shape {:?} does not match {} bytes of {}", step, site,
                                   shape, data.len(), dtype.tag())));
        }
        if self.tensors.iter().any(|t| t.step == step && t.site == site) {
            return Err(err(format!("{}/{} added twice", step, site)));
        }
        self.tensors.push(Tensor { step, site: site.into(), shape: shape.to_vec(), dtype,
                                   data: data.to_vec() });
        Ok(())
    }

    pub fn add_f32(&mut self, step: usize, site: &str, shape: &[usize], data: &[f32]) -> io::Result<()> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add(step, site, shape, DType::F32, &bytes)
    }

    /// `bits`: F16 or BF16 values as raw u16 bits.
    pub fn add_u16(&mut self, step: usize, site: &str, shape: &[usize], dtype: DType, bits: &[u16])
                   -> io::Result<()> {
        if dtype == DType::F32 {
            return Err(err(format!("{}/{}: add_u16 takes F16 or BF16", step, site)));
        }
        let bytes: Vec<u8> = bits.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add(step, site, shape, dtype, &bytes)
    }

    fn shape_json(shape: &[usize]) -> String {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(","))
    }

    fn write_step(&self, path: &Path, step: usize) -> io::Result<()> {
        let mut h = format!("{{\"__metadata__\":{{\"format\":\"pt\",\"step\":\"{}\"}}", step);
        let mut off = 0usize;
        for t in self.tensors.iter().filter(|t| t.step == step) {
            h += &format!(",\"{}/{}\":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
                          step, t.site, t.dtype.tag(), Self::shape_json(&t.shape), off, off + t.data.len());
            off += t.data.len();
        }
        h.push('}');
        while (8 + h.len()) % 8 != 0 {
            h.push(' '); // data starts 8-aligned
        }
        let mut f = io::BufWriter::new(fs::File::create(path)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(h.as_bytes())?;
        for t in self.tensors.iter().filter(|t| t.step == step) {
            f.write_all(&t.data)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    fn manifest(&self) -> String {
        let toks: Vec<String> = self.tokens.iter().map(|t| t.to_string()).collect();
        let mut engine = String::new();
        for c in self.engine.chars() {
            match c {
                '"' | '\\' => { engine.push('\\'); engine.push(c); }
                c if (c as u32) < 0x20 => engine += &format!("\\u{:04x}", c as u32),
                c => engine.push(c),
            }
        }
        let mut entries = Vec::new();
        for step in 0..=self.steps() {
            for t in self.tensors.iter().filter(|t| t.step == step) {
                entries.push(format!(
                    "  {{\"name\": \"{}/{}\", \"file\": \"step-{:04}.safetensors\", \"dtype\": \"{}\", \"shape\": {}}}",
                    step, t.site, step, t.dtype.tag(), Self::shape_json(&t.shape)));
            }
        }
        let dims: Vec<String> = self.dims.iter().map(|(n, v)| format!("\"{}\": {}", n, v)).collect();
        let dims = if dims.is_empty() { String::new() } else { format!(" \"dims\": {{{}}},\n", dims.join(", ")) };
        format!("{{\n \"format\": \"llamadiff-trace\",\n \"format_version\": 1,\n \"n_layer\": {},\n \
                 \"tokens\": [{}],\n \"n_prompt\": {},\n \"steps\": {},\n \"engine\": {{\"name\": \"{}\"}},\n\
                 {} \"tensors\": [\n{}\n ]\n}}\n",
                self.n_layer, toks.join(", "), self.n_prompt, self.steps(), engine, dims, entries.join(",\n"))
    }

    fn write_into(&self, tmp: &Path) -> io::Result<()> {
        fs::create_dir(tmp)?;
        for step in 0..=self.steps() {
            if self.tensors.iter().any(|t| t.step == step) {
                self.write_step(&tmp.join(format!("step-{:04}.safetensors", step)), step)?;
            }
        }
        let mut f = fs::File::create(tmp.join("manifest.json"))?; // the manifest, written last
        f.write_all(self.manifest().as_bytes())?;
        f.sync_all()?;
        if self.out_dir.exists() {
            return Err(err(format!("{} already exists", self.out_dir.display())));
        }
        fs::rename(tmp, &self.out_dir)
    }

    /// Write everything into `.NAME.tmp-PID-RANDOM` next to the target, then rename it into place.
    pub fn close(self) -> io::Result<PathBuf> {
        if self.tensors.is_empty() {
            return Err(err("no tensors were added".into()));
        }
        let name = self.out_dir.file_name().ok_or_else(|| err("bad output path".into()))?
            .to_string_lossy().into_owned();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = self.out_dir.with_file_name(format!(".{}.tmp-{}-{:08x}", name, std::process::id(), nanos));
        match self.write_into(&tmp) {
            Ok(()) => Ok(self.out_dir.clone()),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }
}

/// f32 -> bfloat16 bits, round to nearest even.
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16; // NaN stays NaN
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// f32 -> float16 bits, round to nearest even (overflow gives inf).
pub fn f32_to_f16(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = (u >> 16) & 0x8000;
    let exp = ((u >> 23) & 0xff) as i32;
    let mut mant = u & 0x7f_ffff;
    if exp == 0xff {
        return (sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 }) as u16;
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return (sign | 0x7c00) as u16;
    }
    if e <= 0 {
        if e < -10 {
            return sign as u16;
        }
        mant |= 0x80_0000;
        let shift = (14 - e) as u32;
        let (rest, half) = (mant & ((1 << shift) - 1), 1u32 << (shift - 1));
        let mut r = mant >> shift;
        if rest > half || (rest == half && (r & 1) == 1) {
            r += 1;
        }
        return (sign | r) as u16;
    }
    let mut r = ((e as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into inf: correct
    }
    (sign | r) as u16
}
