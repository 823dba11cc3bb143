//! Reading the project's plain-text inputs: label, target and score matrices.
//!
//! A matrix file is CSV, one row per image and one column per class. A first row with any
//! non-numeric cell is a header of class names. Every error names the file and the line
//! (and the column where it applies), so a user can find the bad cell.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in an input file something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub file: PathBuf,
    /// 1-based line number, when the problem sits on one line.
    pub line: Option<usize>,
    /// 1-based column number, when the problem sits in one cell.
    pub column: Option<usize>,
    pub message: String,
}

impl InputError {
    pub fn new(file: &Path, line: Option<usize>, column: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}

/// A dense row-major matrix read from a file, with optional column names.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Row-major values, `rows * cols` long.
    pub data: Vec<f64>,
    /// Class names from the header row, if the file had one.
    pub header: Option<Vec<String>>,
    /// 1-based line number of each data row in the file (for error messages downstream).
    pub lines: Vec<usize>,
}

impl Matrix {
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// What values a matrix file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Only 0 or 1 (labels, targets).
    Binary,
    /// Finite numbers in [0, 1] (probabilities).
    Probability,
    /// Any finite number.
    Finite,
}

fn split_cells(line: &str) -> Vec<&str> {
    line.split(',').map(|c| c.trim()).collect()
}

/// Reads a CSV matrix file; see the module docs for the format.
pub fn read_matrix(path: &Path, values: Values) -> Result<Matrix, InputError> {
    let text = std::fs::read_to_string(path).map_err(|e| InputError::new(path, None, None, format!("cannot read file: {e}")))?;
    parse_matrix(path, &text, values)
}

/// Parses matrix text as [`read_matrix`] does; `path` only labels errors.
pub fn parse_matrix(path: &Path, text: &str, values: Values) -> Result<Matrix, InputError> {
    // A byte-order mark (spreadsheet exports) would make the first row look non-numeric.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut header: Option<Vec<String>> = None;
    let mut data = Vec::new();
    let mut lines = Vec::new();
    let mut cols: Option<usize> = None;
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let cells = split_cells(line);
        let first_content = header.is_none() && data.is_empty();
        if first_content && cells.iter().any(|c| c.parse::<f64>().is_err()) {
            // Class names key per-class results, so they must be present and distinct.
            for (j, c) in cells.iter().enumerate() {
                if c.is_empty() {
                    return Err(InputError::new(
                        path,
                        Some(lineno),
                        Some(j + 1),
                        "empty class name in the header row",
                    ));
                }
                if let Some(first) = cells[..j].iter().position(|d| d == c) {
                    return Err(InputError::new(
                        path,
                        Some(lineno),
                        Some(j + 1),
                        format!("class name {c:?} repeats column {}", first + 1),
                    ));
                }
            }
            header = Some(cells.iter().map(|s| s.to_string()).collect());
            cols = Some(cells.len());
            continue;
        }
        match cols {
            None => cols = Some(cells.len()),
            Some(c) if c != cells.len() => {
                return Err(InputError::new(
                    path,
                    Some(lineno),
                    None,
                    format!("ragged row: {} columns, expected {c}", cells.len()),
                ))
            }
            _ => {}
        }
        for (j, cell) in cells.iter().enumerate() {
            let col = Some(j + 1);
            let v: f64 = cell
                .parse()
                .map_err(|_| InputError::new(path, Some(lineno), col, format!("expected a number, found {cell:?}")))?;
            if !v.is_finite() {
                return Err(InputError::new(path, Some(lineno), col, format!("value {cell:?} is not finite")));
            }
            match values {
                Values::Binary if v != 0.0 && v != 1.0 => {
                    return Err(InputError::new(path, Some(lineno), col, format!("label {cell:?} is not 0 or 1")))
                }
                Values::Probability if !(0.0..=1.0).contains(&v) => {
                    return Err(InputError::new(
                        path,
                        Some(lineno),
                        col,
                        format!("score {cell:?} is not a probability in [0, 1]"),
                    ))
                }
                _ => {}
            }
            data.push(v);
        }
        lines.push(lineno);
    }
    let cols = cols.unwrap_or(0);
    if lines.is_empty() {
        return Err(InputError::new(path, None, None, "file holds no data rows"));
    }
    Ok(Matrix {
        rows: lines.len(),
        cols,
        data,
        header,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.csv")
    }

    #[test]
    fn header_detected_and_values_read() {
        let m = parse_matrix(p(), "cat,dog\n1,0\n0,1\n", Values::Binary).unwrap();
        assert_eq!(m.header.as_deref(), Some(&["cat".to_string(), "dog".to_string()][..]));
        assert_eq!((m.rows, m.cols), (2, 2));
        assert_eq!(m.data, vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(m.lines, vec![2, 3]);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse_matrix(p(), "1,0\n1,0,1\n", Values::Binary).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), None));
        let e = parse_matrix(p(), "1,0\n1,2\n", Values::Binary).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(2)));
        let e = parse_matrix(p(), "0.5,0.1\n0.2,NaN\n", Values::Probability).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(2)));
        let e = parse_matrix(p(), "a,b\n0.5,x\n", Values::Probability).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(2)));
        assert!(e.to_string().starts_with("t.csv:2:2: "));
        let e = parse_matrix(p(), "cat,dog,cat\n1,0,1\n", Values::Binary).unwrap_err();
        assert_eq!((e.line, e.column), (Some(1), Some(3)));
        let e = parse_matrix(p(), "cat,,dog\n1,0,1\n", Values::Binary).unwrap_err();
        assert_eq!((e.line, e.column), (Some(1), Some(2)));
        assert!(parse_matrix(p(), "", Values::Finite).is_err());
        // A byte-order mark does not turn the first data row into a header.
        let m = parse_matrix(p(), "\u{feff}1,0\n0,1\n", Values::Binary).unwrap();
        assert_eq!((m.rows, m.header), (2, None));
        assert!(parse_matrix(p(), "a,b\n", Values::Finite).is_err());
    }
}
