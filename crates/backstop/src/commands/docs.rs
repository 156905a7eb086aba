//! `backstop completions SHELL` and the hidden `backstop manpages DIR`:
//! shell completions and man pages generated from the command line's own
//! definition (cli.rs), so they never drift from `--help`.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "backstop", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Writes backstop.1 and backstop-COMMAND.1 for every visible command
/// (and its subcommands, as backstop-COMMAND-SUB.1) into `dir`.
pub fn manpages(dir: &Path) -> ExitCode {
    match write_pages(dir) {
        Ok(n) => {
            println!("wrote {n} man pages into {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: cannot write the man pages into {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn write_pages(dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    write_page(dir, &cmd, "backstop")
}

/// The page of `cmd` (named `name`) and of each of its visible
/// subcommands; how many were written.
fn write_page(dir: &Path, cmd: &clap::Command, name: &str) -> std::io::Result<usize> {
    // clap names are 'static; a few dozen short strings, once, in a
    // command that exits right after.
    let page = cmd
        .clone()
        .name(&*Box::leak(name.to_string().into_boxed_str()));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(dir.join(format!("{name}.1")), out)?;
    let mut n = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        n += write_page(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(n)
}
