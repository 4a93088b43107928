//! `coralctl`: the command-line client of corald. Every command is one or a few JSON-RPC calls;
//! `--json` prints the API's own objects (snake_case), one per line when following progress.

mod bridge;
mod follow;
mod generate;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use coral_proto::client::connect;
use coral_proto::{CoralApiClient, LibrarySelector, ScanProgress};
use follow::{Render, Target};
use jsonrpsee::core::client::Error as ClientError;
use serde::Serialize;
use uuid::Uuid;

/// Control the Coral indexer daemon.
#[derive(Debug, Parser)]
#[command(name = "coralctl", version)]
struct Cli {
    /// corald's socket (default: the daemon's default location).
    #[arg(long, global = true, env = "CORAL_SOCKET")]
    socket: Option<PathBuf>,
    /// Print the API's JSON objects instead of tables (one object per line when following).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon version, database, libraries, active scans.
    Status,
    /// Manage libraries.
    #[command(subcommand)]
    Library(LibraryCommand),
    /// Scan a library (incremental unless --full); without LIBRARY, every library.
    Scan {
        /// Library id or root path.
        library: Option<String>,
        /// Only this subdirectory (relative to the library root, or absolute inside it).
        #[arg(long)]
        path: Option<String>,
        /// Re-read every file instead of skipping unchanged ones.
        #[arg(long)]
        full: bool,
        /// Wait until the scan ends and print its summary; non-zero exit unless it completed.
        #[arg(long, conflicts_with = "follow")]
        wait: bool,
        /// Show live progress until the scan ends; non-zero exit unless it completed.
        #[arg(long)]
        follow: bool,
    },
    /// Live progress of every active scan.
    Progress,
    /// Active and recent scans.
    Scans {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a queued or running scan.
    Cancel { request_id: Uuid },
    /// Full-text search (title, artist, album, album artist, genre; accents and case ignored).
    Search {
        query: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// One track in full.
    Track { id: i64 },
    /// Tracks that sound like this one (by id or path), best first. Scores are centred cosine
    /// similarity: about 0 for unrelated tracks, 1 for the same sound.
    Similar {
        /// Track id, or the path of an indexed file.
        track: String,
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Only tracks of this library (id or root path); repeat for several.
        #[arg(long = "library", value_name = "LIBRARY")]
        libraries: Vec<String>,
        /// Only tracks at least this many seconds long.
        #[arg(long, value_name = "SECONDS")]
        min_duration: Option<f64>,
        /// Only tracks at most this many seconds long.
        #[arg(long, value_name = "SECONDS")]
        max_duration: Option<f64>,
        /// At most N tracks of one artist.
        #[arg(long, value_name = "N")]
        max_per_artist: Option<u32>,
        /// Keep other files of the same recording (left out by default).
        #[arg(long)]
        include_same_recording: bool,
        /// Print an M3U8 playlist of the tracks' absolute paths.
        #[arg(long, conflicts_with = "json")]
        m3u: bool,
    },
    /// A sonic path from one track to another (ids or paths): A first, B last, each step
    /// closer to B. Scores are each track's centred cosine to B.
    Path {
        from: String,
        to: String,
        /// Tracks on the path, both ends included (at most).
        #[arg(long, default_value_t = 25)]
        count: u32,
        /// Print an M3U8 playlist of the tracks' absolute paths.
        #[arg(long, conflicts_with = "json")]
        m3u: bool,
    },
    /// Tracks around some seeds (ids or paths, up to 20), or an album's or artist's tracks,
    /// diversified. Scores are centred cosine to the seeds' centroid.
    Mix {
        seeds: Vec<String>,
        /// Seed with the tracks of this album (also: with --artist, that artist's album).
        #[arg(long)]
        album: Option<String>,
        /// Seed with the tracks of this artist.
        #[arg(long)]
        artist: Option<String>,
        #[arg(long, default_value_t = 25)]
        count: u32,
        /// At most N tracks of one artist.
        #[arg(long, value_name = "N")]
        max_per_artist: Option<u32>,
        /// Print an M3U8 playlist of the tracks' absolute paths.
        #[arg(long, conflicts_with = "json")]
        m3u: bool,
    },
    /// Find indexed tracks by what a media server knows: path, MusicBrainz recording id, ISRC,
    /// or artist and title (and duration). Best match first, with the rule that matched.
    Lookup {
        #[arg(long)]
        path: Option<PathBuf>,
        /// MusicBrainz recording id.
        #[arg(long)]
        mbid: Option<String>,
        #[arg(long)]
        isrc: Option<String>,
        #[arg(long)]
        artist: Option<String>,
        #[arg(long)]
        title: Option<String>,
        #[arg(long)]
        album: Option<String>,
        /// Duration in seconds (artist + title matches must be within 3 s of it).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Serve the live progress page, and JSON-RPC over WebSocket and plain HTTP.
    ///
    /// The page is at http://LISTEN/, the API at ws://LISTEN/ws and, by POST, at
    /// http://LISTEN/rpc: corald's methods and notifications, plus `bridge.info` and
    /// `bridge.subscribe` (notifications `bridge.status`, WebSocket only).
    /// Loopback only unless --allow-remote. Requests from origins other than the bridge's own
    /// and --allow-origin ones are refused. Without a token the bridge is read-only; with one,
    /// scan.start, scan.cancel, library.add and library.remove need it: `?token=TOKEN`, the
    /// subprotocol `coral.token.TOKEN` on /ws, or `Authorization: Bearer TOKEN` on /rpc;
    /// --token-required-for-reads makes every method need it. Open the page as
    /// http://LISTEN/?token=TOKEN, or type the token into it.
    Bridge(bridge::BridgeArgs),
    /// Write shell completions or man pages into DIR (used when packaging).
    #[command(hide = true)]
    Generate { what: generate::What, dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum LibraryCommand {
    /// Register a directory as a library and scan it.
    Add { path: PathBuf },
    /// Every library with track and failure counts and its last scan.
    List,
    /// Forget a library (files on disk are not touched).
    Remove { library: String },
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn render_mode(json: bool) -> Render {
    if json {
        Render::Json
    } else if std::io::stdout().is_terminal() {
        Render::Bars
    } else {
        Render::Lines
    }
}

/// Map an API error to a message without the JSON-RPC wrapping.
fn describe(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(ClientError::Call(obj)) = cause.downcast_ref::<ClientError>() {
            // Invalid-params errors carry the decoding problem in `data`.
            return match obj.data() {
                Some(data) => format!("{}: {}", obj.message(), data.get().trim_matches('"')),
                None => obj.message().to_owned(),
            };
        }
    }
    format!("{e:#}")
}

async fn run(cli: Cli) -> Result<u8> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(coral_proto::paths::default_client_socket_path);
    if let Command::Generate { what, dir } = &cli.command {
        generate::write(*what, dir)?;
        return Ok(0);
    }
    if let Command::Bridge(args) = cli.command {
        // Runs (and reconnects) whether or not corald is up.
        bridge::run(args, socket).await?;
        return Ok(0);
    }
    let client = connect(&socket).await?;
    let json = cli.json;
    match cli.command {
        Command::Status => {
            let s = client.daemon_status().await?;
            if json {
                print_json(&s)?
            } else {
                output::status(&s)
            }
        }
        Command::Library(LibraryCommand::Add { path }) => {
            let abs = std::path::absolute(&path)
                .with_context(|| format!("cannot resolve {}", path.display()))?;
            let lib = client
                .library_add(abs.to_string_lossy().into_owned())
                .await?;
            if json {
                print_json(&lib)?
            } else {
                println!("added library {} at {}", lib.id, lib.path);
                if let Some(scan) = &lib.last_scan {
                    println!("scan queued: {}", scan.scan.request_id);
                }
            }
        }
        Command::Library(LibraryCommand::List) => {
            let libs = client.library_list().await?;
            if json {
                print_json(&libs)?
            } else {
                output::libraries(&libs)
            }
        }
        Command::Library(LibraryCommand::Remove { library }) => {
            let lib = client.library_remove(selector(&library)).await?;
            if json {
                print_json(&lib)?
            } else {
                println!("removed library {} ({})", lib.id, lib.path)
            }
        }
        Command::Scan {
            library,
            path,
            full,
            wait,
            follow,
        } => {
            let targets: Vec<LibrarySelector> = match library {
                Some(l) => vec![selector(&l)],
                None => client
                    .library_list()
                    .await?
                    .into_iter()
                    .map(|l| LibrarySelector::Id(l.id))
                    .collect(),
            };
            if targets.is_empty() {
                anyhow::bail!("no libraries to scan; add one with `coralctl library add PATH`");
            }
            let mut started = Vec::new();
            for t in targets {
                started.push(client.scan_start(t, path.clone(), Some(full)).await?);
            }
            if !wait && !follow {
                if json {
                    if started.len() == 1 {
                        print_json(&started[0])?
                    } else {
                        print_json(&started)?
                    }
                } else {
                    for s in &started {
                        println!(
                            "scan {} {} for library {}",
                            s.request_id,
                            if s.merged {
                                "(merged into a queued scan)"
                            } else {
                                "queued"
                            },
                            s.library_id
                        );
                    }
                }
                return Ok(0);
            }
            let mode = if wait {
                Render::Quiet
            } else {
                render_mode(json)
            };
            let mut code = 0;
            for s in started {
                let finals = follow::follow(&socket, Target::One(s.request_id), mode).await?;
                for p in &finals {
                    code = code.max(follow::exit_code(p));
                    if wait {
                        if json {
                            print_json(p)?
                        } else {
                            println!("{}", output::scan_summary(p))
                        }
                    } else if mode == Render::Bars {
                        println!("{}", output::scan_summary(p));
                    }
                }
            }
            return Ok(code);
        }
        Command::Progress => {
            let finals = follow::follow(&socket, Target::AllActive, render_mode(json)).await?;
            let code = finals.iter().map(follow::exit_code).max().unwrap_or(0);
            if !json {
                for p in &finals {
                    println!("{}", output::scan_summary(p));
                }
            }
            return Ok(code);
        }
        Command::Scans { limit } => {
            let list: Vec<ScanProgress> = client.scan_list(Some(limit)).await?;
            if json {
                print_json(&list)?
            } else {
                output::scans(&list)
            }
        }
        Command::Cancel { request_id } => {
            let p = client.scan_cancel(request_id).await?;
            if json {
                print_json(&p)?
            } else {
                println!(
                    "cancellation requested for scan {request_id} ({})",
                    p.phase.as_str()
                )
            }
        }
        Command::Search {
            query,
            limit,
            offset,
        } => {
            let hits = client
                .track_search(query, Some(limit), Some(offset))
                .await?;
            if json {
                print_json(&hits)?
            } else {
                output::tracks(&hits)
            }
        }
        Command::Track { id } => {
            let t = client.track_get(id).await?;
            if json {
                print_json(&t)?
            } else {
                output::track(&t)
            }
        }
        Command::Similar {
            track,
            limit,
            libraries,
            min_duration,
            max_duration,
            max_per_artist,
            include_same_recording,
            m3u,
        } => {
            let library_ids = if libraries.is_empty() {
                None
            } else {
                Some(library_ids(&client, &libraries).await?)
            };
            let options = coral_proto::SimilarOptions {
                library_ids,
                min_duration_s: min_duration,
                max_duration_s: max_duration,
                exclude_same_recording: Some(!include_same_recording),
                max_per_artist,
            };
            let list = client
                .track_similar(track_ref(&track), Some(limit), Some(options))
                .await?;
            print_scored(&list, json, m3u)?
        }
        Command::Path {
            from,
            to,
            count,
            m3u,
        } => {
            let list = client
                .track_path(track_ref(&from), track_ref(&to), Some(count), None)
                .await?;
            print_scored(&list, json, m3u)?
        }
        Command::Mix {
            seeds,
            album,
            artist,
            count,
            max_per_artist,
            m3u,
        } => {
            let group = coral_proto::SeedGroup {
                tracks: seeds.iter().map(|s| track_ref(s)).collect(),
                album,
                artist,
            };
            let options = coral_proto::SimilarOptions {
                max_per_artist,
                ..coral_proto::SimilarOptions::default()
            };
            let list = client
                .track_mix(
                    coral_proto::MixSeeds::Group(group),
                    Some(count),
                    Some(options),
                )
                .await?;
            print_scored(&list, json, m3u)?
        }
        Command::Lookup {
            path,
            mbid,
            isrc,
            artist,
            title,
            album,
            duration,
            limit,
        } => {
            let query = coral_proto::TrackLookup {
                path: path.map(|p| {
                    std::path::absolute(&p)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned()
                }),
                mbid,
                isrc,
                artist,
                title,
                duration_s: duration,
                album,
            };
            let found = client.track_lookup(query, Some(limit)).await?;
            if json {
                print_json(&found)?
            } else {
                output::matches(&found)
            }
        }
        // Served above, before connecting.
        Command::Bridge(_) | Command::Generate { .. } => {}
    }
    Ok(0)
}

/// Scored tracks as JSON, an M3U8 playlist, or a table.
fn print_scored(list: &[coral_proto::SimilarTrack], json: bool, m3u: bool) -> Result<()> {
    if json {
        print_json(&list)?
    } else if m3u {
        let tracks: Vec<_> = list.iter().map(|s| &s.track).collect();
        print!("{}", output::m3u(&tracks))
    } else {
        output::similar(list)
    }
    Ok(())
}

/// A track argument: all digits is an id, anything else a path (made absolute).
fn track_ref(arg: &str) -> coral_proto::TrackRef {
    match coral_proto::TrackRef::parse_arg(arg) {
        coral_proto::TrackRef::Key(coral_proto::TrackKey {
            path: Some(p),
            id: None,
            mbid: None,
        }) => coral_proto::TrackRef::Key(coral_proto::TrackKey {
            path: Some(
                std::path::absolute(&p)
                    .map(|a| a.to_string_lossy().into_owned())
                    .unwrap_or(p),
            ),
            ..coral_proto::TrackKey::default()
        }),
        other => other,
    }
}

/// Library ids of `--library` arguments (ids, or root paths looked up in `library.list`).
async fn library_ids(
    client: &jsonrpsee::async_client::Client,
    args: &[String],
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(args.len());
    let mut listed = None;
    for arg in args {
        match selector(arg) {
            LibrarySelector::Id(id) => ids.push(id),
            LibrarySelector::Path(p) => {
                if listed.is_none() {
                    listed = Some(client.library_list().await?);
                }
                let found = listed
                    .iter()
                    .flatten()
                    .find(|l| l.path == p)
                    .with_context(|| format!("no library has the path {p}"))?;
                ids.push(found.id);
            }
        }
    }
    Ok(ids)
}

fn selector(arg: &str) -> LibrarySelector {
    match LibrarySelector::parse_arg(arg) {
        LibrarySelector::Path(p) => LibrarySelector::Path(
            std::path::absolute(&p)
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or(p),
        ),
        id => id,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coralctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("coralctl: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
