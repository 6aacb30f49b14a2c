//! Rule files on disk: a directory read into source files, compiled into a rule set, and the
//! errors that name file, line and field.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{DomainFiles, RuleSet, compile_file};

/// A problem in a rule file, placed as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The line, when the file allows placing it.
    pub line: Option<usize>,
    /// The column, with the line.
    pub column: Option<usize>,
    /// Where in the document: `descriptors[1].rate_limit.unit`.
    pub field: Option<String>,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A rule file as read from disk.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Where it was read from (or what names it in errors).
    pub path: PathBuf,
    /// Its YAML text.
    pub text: String,
}

/// The rule files of a directory: `*.yaml` and `*.yml`, not hidden, symlinks followed (as a
/// Kubernetes ConfigMap volume lays them out), sorted by name. A file that cannot be read is an
/// error of its own and does not keep the others from loading.
pub fn read_dir(dir: &Path) -> Result<(Vec<SourceFile>, Vec<ConfigError>), ConfigError> {
    let io_error = |path: &Path, e: std::io::Error| ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_rule_file = !name.starts_with('.')
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
            && path.is_file();
        if is_rule_file {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push(SourceFile { path, text }),
            Err(e) => errors.push(io_error(&path, e)),
        }
    }
    Ok((files, errors))
}

/// Reads and compiles a rule directory, reporting every error of every file. Each domain
/// must live in one file.
pub fn load_dir(dir: &Path) -> Result<RuleSet, Vec<ConfigError>> {
    load_dir_with(dir, DomainFiles::One)
}

/// [`load_dir`], saying whether the files of one domain are merged.
pub fn load_dir_with(dir: &Path, domain_files: DomainFiles) -> Result<RuleSet, Vec<ConfigError>> {
    let (files, mut errors) = read_dir(dir).map_err(|e| vec![e])?;
    let mut domains = Vec::new();
    for file in &files {
        match compile_file(file) {
            Ok(domain) => domains.push(Arc::new(domain)),
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }
    let (set, mut domain_errors) = RuleSet::assemble(domains, domain_files);
    errors.append(&mut domain_errors);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(errors)
    }
}
