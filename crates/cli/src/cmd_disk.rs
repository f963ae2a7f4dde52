//! `corefour disk`: inspect, create, convert, check, resize and map disk images, with qemu-img's
//! option habits (`-f`, `-O`, `-o backing_file=...`), and import physical disks (P2V).

use anyhow::{bail, Context};
use clap::Subcommand;
use corefour_disk::qcow2::{CreateOptions, Qcow2, Repair};
use corefour_disk::size::{human, parse_size};
use corefour_disk::{convert, open, p2v, BlockRead, DiskSize, ExtentKind, Format, ImageInfo, Open};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show an image's format, sizes and backing chain.
    Info {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Also describe every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        #[arg(long)]
        json: bool,
        /// qemu-img style: `--output json`.
        #[arg(long, value_name = "human|json")]
        output: Option<String>,
        file: PathBuf,
    },
    /// Create an empty image (raw or qcow2).
    Create {
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Options: backing_file, backing_fmt, cluster_size, compat (0.10|1.1), refcount_bits.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Backing file (same as -o backing_file=).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format (same as -o backing_fmt=).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        file: PathBuf,
        /// Size with an optional K/M/G/T suffix; defaults to the backing file's size.
        size: Option<String>,
    },
    /// Convert an image of any supported format into a new raw or qcow2 image.
    Convert {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Show progress (default on a terminal).
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Output cache mode as in qemu-img: unsafe (default, no fsync), writeback, none or
        /// directsync (all three fsync the output before exiting).
        #[arg(short = 't', default_value = "unsafe")]
        cache: String,
        /// Parallel reader threads (like qemu-img's -m).
        #[arg(short = 'm', default_value_t = 4)]
        threads: usize,
        #[arg(long)]
        json: bool,
        source: PathBuf,
        output: PathBuf,
    },
    /// Check a qcow2 image's consistency; `-r leaks|all` repairs. Exit 2 = corrupt, 3 = leaks.
    Check {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'r', value_name = "leaks|all")]
        repair: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "human|json")]
        output: Option<String>,
        file: PathBuf,
    },
    /// Change an image's virtual size: `SIZE`, `+SIZE` or `-SIZE` (shrinking needs --shrink).
    Resize {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long)]
        shrink: bool,
        #[arg(short = 'q')]
        quiet: bool,
        file: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Show which ranges hold data and which are zero/unallocated.
    Map {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "human|json")]
        output: Option<String>,
        file: PathBuf,
    },
    /// P2V: copy a block device (or an image of one) into a new image, skipping zero blocks and
    /// reporting its SHA-256; or, with --from-tree, build an ext4 image from a root filesystem.
    ImportPhysical {
        /// Output format (qcow2 or raw).
        #[arg(short = 'O', default_value = "qcow2")]
        out_format: String,
        /// Build the image from this root filesystem tree instead of SOURCE.
        #[arg(long, value_name = "DIR")]
        from_tree: Option<PathBuf>,
        /// Size of the ext4 filesystem for --from-tree (default: tree size + 30% + 64 MiB).
        #[arg(long)]
        size: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(long)]
        json: bool,
        /// SOURCE then OUTPUT; with --from-tree only OUTPUT.
        #[arg(num_args = 1..=2, required = true)]
        paths: Vec<PathBuf>,
    },
}

fn want_json(json: bool, output: &Option<String>) -> anyhow::Result<bool> {
    match output.as_deref() {
        None => Ok(json),
        Some("json") => Ok(true),
        Some("human") => Ok(json),
        Some(o) => bail!("--output must be human or json, not '{o}'"),
    }
}

fn fmt_opt(f: &Option<String>) -> anyhow::Result<Option<Format>> {
    Ok(match f {
        Some(s) => Some(Format::parse(s)?),
        None => None,
    })
}

/// Parses `-o key=value,key=value` (several -o allowed) into qcow2 creation options.
fn create_options(opts: &[String]) -> anyhow::Result<CreateOptions> {
    let mut c = CreateOptions::default();
    for kv in opts.iter().flat_map(|o| o.split(',')) {
        if kv.is_empty() {
            continue;
        }
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("option '{kv}' must be key=value"))?;
        match k {
            "backing_file" => c.backing_file = Some(v.to_string()),
            "backing_fmt" => c.backing_format = Some(Format::parse(v)?),
            "cluster_size" => c.cluster_size = parse_size(v)?,
            "refcount_bits" => c.refcount_bits = v.parse().context("refcount_bits")?,
            "compat" => {
                c.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("compat must be 0.10 or 1.1, not '{v}'"),
                }
            }
            "preallocation" if v == "off" => {}
            "lazy_refcounts" if v == "off" => {}
            _ => bail!(
                "unsupported option '{k}={v}' (known: backing_file, backing_fmt, cluster_size, compat, refcount_bits)"
            ),
        }
    }
    Ok(c)
}

/// A progress bar on a terminal, nothing otherwise.
pub(crate) struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// `force` is qemu-img's -p; a bar still needs a terminal to draw on.
    pub(crate) fn new(total: u64, force: bool, quiet: bool) -> Progress {
        let _ = force;
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style);
        }
        Progress(Some(pb))
    }
    pub(crate) fn set(&self, done: u64) {
        if let Some(pb) = &self.0 {
            pb.set_position(done);
        }
    }
    pub(crate) fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.cmd {
        Cmd::Info {
            format,
            backing_chain,
            json,
            output,
            file,
        } => info(
            &file,
            fmt_opt(&format)?,
            backing_chain,
            want_json(json, &output)?,
        ),
        Cmd::Create {
            format,
            options,
            backing,
            backing_format,
            quiet,
            file,
            size,
        } => {
            let format = Format::parse(&format)?;
            let mut opts = create_options(&options)?;
            if backing.is_some() {
                opts.backing_file = backing;
            }
            if let Some(f) = backing_format {
                opts.backing_format = Some(Format::parse(&f)?);
            }
            let size = size.as_deref().map(parse_size).transpose()?;
            match format {
                Format::Raw => {
                    if opts.backing_file.is_some() {
                        bail!("raw images cannot have a backing file; use -f qcow2");
                    }
                    let size = size.context("a size is required for raw images")?;
                    corefour_disk::raw::RawImage::create(&file, size)?;
                }
                Format::Qcow2 => {
                    Qcow2::create(&file, size, &opts)?;
                }
                other => bail!("cannot create {other} images; create qcow2 or raw"),
            }
            if !quiet {
                let img = open(
                    &file,
                    Open {
                        format: Some(format),
                        write: false,
                    },
                )?;
                println!(
                    "Formatting '{}', fmt={} size={}{}",
                    file.display(),
                    format,
                    img.size(),
                    opts.backing_file
                        .as_ref()
                        .map(|b| format!(" backing_file={b}"))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        Cmd::Convert {
            format,
            out_format,
            options,
            progress,
            quiet,
            cache,
            threads,
            json,
            source,
            output,
        } => {
            let sync = match cache.as_str() {
                "unsafe" => false,
                "writeback" | "none" | "directsync" | "writethrough" => true,
                other => bail!(
                    "-t must be unsafe, writeback, writethrough, none or directsync, not '{other}'"
                ),
            };
            let out_format = Format::parse(&out_format)?;
            let opts = create_options(&options)?;
            if opts.backing_file.is_some() {
                bail!("convert writes a self-contained image; -o backing_file is not supported");
            }
            if same_file(&source, &output) {
                bail!("source and output are the same file");
            }
            let src_open = Open {
                format: fmt_opt(&format)?,
                write: false,
            };
            let total = open(&source, src_open)?.size();
            let bar = Progress::new(total, progress, quiet);
            let t = std::time::Instant::now();
            let stats = convert::convert_path(
                &source,
                src_open,
                &output,
                out_format,
                &opts,
                sync,
                threads,
                &mut |d, _| bar.set(d),
            );
            bar.finish();
            let stats = match stats {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_file(&output);
                    return Err(e.into());
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else if !quiet && std::io::stderr().is_terminal() {
                eprintln!(
                    "converted {} ({} written) in {:.2}s",
                    human(stats.virtual_size),
                    human(stats.bytes_written),
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(0)
        }
        Cmd::Check {
            format,
            repair,
            json,
            output,
            file,
        } => check(
            &file,
            fmt_opt(&format)?,
            repair.as_deref(),
            want_json(json, &output)?,
        ),
        Cmd::Resize {
            format,
            shrink,
            quiet,
            file,
            size,
        } => {
            let mut img = open(
                &file,
                Open {
                    format: fmt_opt(&format)?,
                    write: true,
                },
            )?;
            let old = img.size();
            let new = if let Some(d) = size.strip_prefix('+') {
                old.checked_add(parse_size(d)?).context("size overflow")?
            } else if let Some(d) = size.strip_prefix('-') {
                old.checked_sub(parse_size(d)?)
                    .context("cannot shrink below zero")?
            } else {
                parse_size(&size)?
            };
            if new < old && !shrink {
                bail!(
                    "shrinking from {old} to {new} bytes loses data past the new end; pass --shrink if that is intended"
                );
            }
            img.resizer()?.resize(new)?;
            if !quiet {
                println!("Image resized.");
            }
            Ok(0)
        }
        Cmd::Map {
            format,
            json,
            output,
            file,
        } => map(&file, fmt_opt(&format)?, want_json(json, &output)?),
        Cmd::ImportPhysical {
            out_format,
            from_tree,
            size,
            quiet,
            json,
            paths,
        } => import_physical(out_format, from_tree, size, quiet, json, paths),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn print_info(i: &ImageInfo) {
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        human(i.virtual_size),
        i.virtual_size
    );
    println!("disk size: {}", human(i.actual_size));
    if let Some(c) = i.cluster_size {
        println!("cluster_size: {c}");
    }
    if let Some(b) = &i.backing_filename {
        println!("backing file: {b}");
    }
    if let Some(b) = &i.backing_filename_format {
        println!("backing file format: {b}");
    }
    if !i.format_specific.is_empty() {
        println!("Format specific information:");
        for (k, v) in &i.format_specific {
            println!("    {k}: {v}");
        }
    }
}

fn info(file: &Path, format: Option<Format>, chain: bool, json: bool) -> anyhow::Result<i32> {
    let img = open(
        file,
        Open {
            format,
            write: false,
        },
    )?;
    let info = img.info();
    let mut list = vec![info.clone()];
    if chain {
        let mut cur = info.backing_image.clone();
        while let Some(b) = cur {
            cur = b.backing_image.clone();
            list.push(*b);
        }
    }
    if json {
        if chain {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    } else {
        for (n, i) in list.iter().enumerate() {
            if n > 0 {
                println!();
            }
            print_info(i);
        }
    }
    Ok(0)
}

fn check(
    file: &Path,
    format: Option<Format>,
    repair: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    let repair = match repair {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(o) => bail!("-r must be leaks or all, not '{o}'"),
    };
    let format = match format {
        Some(f) => f,
        None => {
            let f = std::fs::File::open(file)
                .with_context(|| format!("{}: cannot open", file.display()))?;
            let storage = corefour_disk::storage::FileStorage::new(f);
            corefour_disk::probe(&storage, file)?
        }
    };
    if format != Format::Qcow2 {
        open(
            file,
            Open {
                format: Some(format),
                write: false,
            },
        )?;
        println!(
            "{}: {format} images have no metadata to check",
            file.display()
        );
        return Ok(0);
    }
    let mut q = Qcow2::open_for_check(file, repair != Repair::None)?;
    let r = q.check(repair)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for m in &r.messages {
            println!("{m}");
        }
        if r.corruptions == 0 && r.leaks == 0 {
            println!("No errors were found on the image.");
        } else {
            if r.leaks > 0 {
                println!(
                    "{} leaked clusters were found on the image{}.",
                    r.leaks,
                    if r.leaks_fixed > 0 {
                        " and repaired"
                    } else {
                        ""
                    }
                );
            }
            if r.corruptions > 0 {
                println!(
                    "{} errors were found on the image{}.",
                    r.corruptions,
                    if r.corruptions_fixed > 0 {
                        " and repaired"
                    } else {
                        ""
                    }
                );
            }
        }
        println!(
            "{}/{} = {:.2}% allocated, {} compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            if r.total_clusters > 0 {
                r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
            } else {
                0.0
            },
            r.compressed_clusters
        );
        println!("Image end offset: {}", r.image_end_offset);
    }
    Ok(r.exit_code())
}

#[derive(serde::Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

fn map(file: &Path, format: Option<Format>, json: bool) -> anyhow::Result<i32> {
    let mut img = open(
        file,
        Open {
            format,
            write: false,
        },
    )?;
    let size = img.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let e = img.extent(off, size - off)?;
        if e.length == 0 {
            bail!("{}: image map stalled at offset {off:#x}", file.display());
        }
        let data = e.kind == ExtentKind::Data;
        let merged = out.last_mut().is_some_and(|l| {
            let contiguous = match (l.offset, e.offset) {
                (Some(a), Some(b)) => a + l.length == b,
                (None, None) => true,
                _ => false,
            };
            if l.data == data && l.depth == e.depth && contiguous {
                l.length += e.length;
                true
            } else {
                false
            }
        });
        if !merged {
            out.push(MapEntry {
                start: off,
                length: e.length,
                depth: e.depth,
                present: data,
                zero: !data,
                data,
                offset: e.offset,
            });
        }
        off += e.length;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<20}{:<20}{:<20}File", "Offset", "Length", "Mapped to");
        for m in out.iter().filter(|m| m.data) {
            println!(
                "{:<#20x}{:<#20x}{:<20}{}",
                m.start,
                m.length,
                m.offset
                    .map(|o| format!("{o:#x}"))
                    .unwrap_or_else(|| "-".into()),
                file.display()
            );
        }
    }
    Ok(0)
}

fn import_physical(
    out_format: String,
    from_tree: Option<PathBuf>,
    size: Option<String>,
    quiet: bool,
    json: bool,
    paths: Vec<PathBuf>,
) -> anyhow::Result<i32> {
    let out_format = Format::parse(&out_format)?;
    if let Some(tree) = from_tree {
        let [out] = paths.as_slice() else {
            bail!("with --from-tree give only the output path");
        };
        let size = size.as_deref().map(parse_size).transpose()?;
        let report = p2v::from_tree(&tree, out, out_format, size)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.to_text());
        }
        return Ok(0);
    }
    let [src, out] = paths.as_slice() else {
        bail!("usage: corefour disk import-physical SOURCE OUTPUT");
    };
    let total = p2v::source_size(src)?;
    let bar = Progress::new(total, false, quiet);
    let r = p2v::import_device(src, out, out_format, &mut |d, _| bar.set(d));
    bar.finish();
    let r = r?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("source: {} ({} bytes)", r.source, r.size);
        println!("output: {} ({})", r.output, r.format);
        println!("sha256: {}", r.sha256);
        println!(
            "copied {} of data, skipped {} of zeros",
            human(r.bytes_written),
            human(r.size - r.bytes_written)
        );
    }
    Ok(0)
}
