//! `coralctl generate completions|man DIR` (hidden): shell completions (bash, zsh, fish) and
//! man pages (`coralctl.1` and one page per subcommand) generated from the clap definition, so
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
        What::Man => {
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            let mut pages: Vec<_> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "1"))
                .collect();
            pages.sort();
            for p in pages {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}
