//! `coralctl generate completions|man DIR` (hidden): shell completions (bash, zsh, fish) and
//! man pages (`coralctl.1` and one page per visible subcommand) generated from the clap definition, so
//! they never drift from the real flags. Packaging runs it on the built binary.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// `coralctl.bash`, `_coralctl` (zsh) and `coralctl.fish`.
    Completions,
    /// `coralctl.1` and `coralctl-<subcommand>.1`.
    Man,
}

/// Write `what` into `dir` (created if needed) and list the files on stdout.
pub fn write(what: What, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = crate::Cli::command();
    cmd.build();
    match what {
        What::Completions => {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = clap_complete::generate_to(shell, &mut cmd, "coralctl", dir)
                    .with_context(|| {
                        format!("cannot write {shell} completions into {}", dir.display())
                    })?;
                println!("{}", path.display());
            }
        }
        What::Man => write_man(&cmd, dir)?,
    }
    Ok(())
}

/// `coralctl.1`, then one page per visible subcommand (`coralctl-library-add.1`), skipping
/// clap's generated `help` subcommands.
fn write_man(cmd: &clap::Command, dir: &Path) -> Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_man(sub, dir)?;
    }
    Ok(())
}
