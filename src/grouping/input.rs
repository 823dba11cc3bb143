//! Reading the grouping's inputs: a co-occurrence JSON file, labels as a 0/1 CSV matrix or as
//! per-image label lists, a class list, and reference groupings to compare with. Every error
//! names the file and line (and column where it applies).

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

use super::cooccurrence::Cooccurrence;
use crate::io::{read_matrix, InputError, Values};

/// Class names and their counts, from whichever input the user gave.
#[derive(Debug, Clone)]
pub struct LabelStats {
    pub classes: Vec<String>,
    pub co: Cooccurrence,
}

fn read_text(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|e| InputError::new(path, None, None, format!("cannot read file: {e}")))
}

/// 1-based (line, column) of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// One step into a JSON document: an object key or an array index.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// `i` at an opening quote; returns the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'[' | b'{' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b']' | b'}') && !b[j].is_ascii_whitespace() {
                j += 1;
            }
            Some(j)
        }
    }
}

/// Best-effort byte offset of the value at `path` in already-parsed JSON text, to point error
/// messages at the bad element; stops at the deepest step it can reach.
fn locate(text: &str, path: &[Step]) -> usize {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    for step in path {
        let reached = i;
        let next = match *step {
            Step::Key(key) => (|| {
                if b.get(i) != Some(&b'{') {
                    return None;
                }
                let mut j = skip_ws(b, i + 1);
                loop {
                    let end = skip_string(b, j)?;
                    let name = &text[j + 1..end - 1];
                    j = skip_ws(b, end);
                    if b.get(j) != Some(&b':') {
                        return None;
                    }
                    j = skip_ws(b, j + 1);
                    if name == key {
                        return Some(j);
                    }
                    j = skip_ws(b, skip_value(b, j)?);
                    if b.get(j) != Some(&b',') {
                        return None;
                    }
                    j = skip_ws(b, j + 1);
                }
            })(),
            Step::Index(idx) => (|| {
                if b.get(i) != Some(&b'[') {
                    return None;
                }
                let mut j = skip_ws(b, i + 1);
                for _ in 0..idx {
                    j = skip_ws(b, skip_value(b, j)?);
                    if b.get(j) != Some(&b',') {
                        return None;
                    }
                    j = skip_ws(b, j + 1);
                }
                Some(j)
            })(),
        };
        match next {
            Some(n) => i = n,
            None => return reached,
        }
    }
    i
}

fn json_error(path: &Path, text: &str, at: &[Step], message: String) -> InputError {
    let (line, col) = line_col(text, locate(text, at));
    InputError::new(path, Some(line), Some(col), message)
}

fn serde_error(path: &Path, e: serde_json::Error) -> InputError {
    if e.line() == 0 {
        return InputError::new(path, None, None, format!("invalid JSON: {e}"));
    }
    // serde_json appends " at line L column C" itself; keep only the message part.
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    InputError::new(path, Some(e.line()), Some(e.column()), format!("invalid JSON: {msg}"))
}

#[derive(Deserialize)]
struct CooccurrenceFile {
    classes: Vec<String>,
    counts: Vec<u64>,
    cooccurrence: Vec<Vec<u64>>,
}

/// Reads `{"classes": [...], "counts": [...], "cooccurrence": [[...]]}` (other keys ignored):
/// K names, c_i per class and the K x K pair counts, which must be symmetric with
/// C_ij <= min(c_i, c_j) off the diagonal. The diagonal is ignored (ML-GCN's files hold zeros
/// there) and set to c_i.
pub fn read_cooccurrence_json(path: &Path) -> Result<LabelStats, InputError> {
    let text = read_text(path)?;
    parse_cooccurrence_json(path, &text)
}

/// Parses co-occurrence JSON text as [`read_cooccurrence_json`] does; `path` only labels errors.
pub fn parse_cooccurrence_json(path: &Path, text: &str) -> Result<LabelStats, InputError> {
    if text.trim().is_empty() {
        return Err(InputError::new(path, None, None, "file is empty"));
    }
    let file: CooccurrenceFile = serde_json::from_str(text).map_err(|e| serde_error(path, e))?;
    let k = file.classes.len();
    let err = |at: &[Step], msg: String| json_error(path, text, at, msg);
    if k == 0 {
        return Err(err(&[Step::Key("classes")], "\"classes\" is empty".into()));
    }
    check_unique(&file.classes).map_err(|(j, name)| {
        err(
            &[Step::Key("classes"), Step::Index(j)],
            format!("class {name:?} appears twice in \"classes\""),
        )
    })?;
    if file.counts.len() != k {
        return Err(err(
            &[Step::Key("counts")],
            format!("\"counts\" has {} entries, expected {k} (one per class)", file.counts.len()),
        ));
    }
    if file.cooccurrence.len() != k {
        return Err(err(
            &[Step::Key("cooccurrence")],
            format!("\"cooccurrence\" has {} rows, expected a {k} x {k} matrix", file.cooccurrence.len()),
        ));
    }
    for (i, row) in file.cooccurrence.iter().enumerate() {
        if row.len() != k {
            return Err(err(
                &[Step::Key("cooccurrence"), Step::Index(i)],
                format!("\"cooccurrence\" row {} has {} entries, expected {k}", i + 1, row.len()),
            ));
        }
    }
    let mut co = Cooccurrence::empty(k);
    co.counts.clone_from(&file.counts);
    // Images holding at least one label; the true total is unknown from these counts.
    co.n_images = file.counts.iter().copied().max().unwrap_or(0);
    for i in 0..k {
        for j in 0..k {
            let at = [Step::Key("cooccurrence"), Step::Index(i), Step::Index(j)];
            let v = file.cooccurrence[i][j];
            if i == j {
                co.pairs[i * k + i] = file.counts[i];
                continue;
            }
            if v != file.cooccurrence[j][i] {
                return Err(err(
                    &at,
                    format!(
                        "\"cooccurrence\" is not symmetric: [{i}][{j}] = {v} but [{j}][{i}] = {}",
                        file.cooccurrence[j][i]
                    ),
                ));
            }
            if v > file.counts[i].min(file.counts[j]) {
                return Err(err(
                    &at,
                    format!(
                        "\"cooccurrence\"[{i}][{j}] = {v} exceeds the counts of {:?} ({}) or {:?} ({})",
                        file.classes[i], file.counts[i], file.classes[j], file.counts[j]
                    ),
                ));
            }
            co.pairs[i * k + j] = v;
        }
    }
    Ok(LabelStats { classes: file.classes, co })
}

/// First repeated name: (index of the repeat, name).
fn check_unique(names: &[String]) -> Result<(), (usize, String)> {
    let mut seen = HashMap::new();
    for (j, n) in names.iter().enumerate() {
        if seen.insert(n.as_str(), j).is_some() {
            return Err((j, n.clone()));
        }
    }
    Ok(())
}

/// Reads a 0/1 label CSV (one row per image, one column per class, optional header row of
/// class names; see [`crate::io`]). Without a header the classes are named by column index
/// "0", "1", ...
pub fn read_label_matrix(path: &Path) -> Result<LabelStats, InputError> {
    let m = read_matrix(path, Values::Binary)?;
    if m.cols == 0 {
        return Err(InputError::new(path, None, None, "the label matrix has no columns"));
    }
    let classes = match m.header {
        Some(h) => {
            check_unique(&h)
                .map_err(|(j, name)| InputError::new(path, Some(1), Some(j + 1), format!("class {name:?} appears twice in the header")))?;
            h
        }
        None => (0..m.cols).map(|j| j.to_string()).collect(),
    };
    let labels: Vec<f32> = m.data.iter().map(|&v| v as f32).collect();
    Ok(LabelStats {
        co: Cooccurrence::from_dense(m.cols, &labels),
        classes,
    })
}

/// Reads a class list: one name per line (surrounding spaces trimmed, blank lines skipped).
pub fn read_classes(path: &Path) -> Result<Vec<String>, InputError> {
    let text = read_text(path)?;
    let mut names = Vec::new();
    let mut line_of = HashMap::new();
    for (idx, raw) in text.lines().enumerate() {
        let name = raw.trim();
        if name.is_empty() {
            continue;
        }
        if let Some(first) = line_of.insert(name.to_string(), idx + 1) {
            return Err(InputError::new(
                path,
                Some(idx + 1),
                None,
                format!("class {name:?} is listed twice (first on line {first})"),
            ));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(InputError::new(path, None, None, "the class list is empty"));
    }
    Ok(names)
}

/// Reads per-image label lists: one line per image holding class names from `classes`,
/// separated by commas (then names may contain spaces, as COCO's "traffic light") or, on a
/// line without commas, by spaces (a line that is exactly one class name is that one label). A blank line is an image with no labels. Streams the file,
/// so millions of images cost memory for the K x K counts only.
pub fn read_label_lists(path: &Path, classes: &[String]) -> Result<Cooccurrence, InputError> {
    let file = std::fs::File::open(path).map_err(|e| InputError::new(path, None, None, format!("cannot read file: {e}")))?;
    let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut co = Cooccurrence::empty(classes.len());
    let (mut list, mut scratch) = (Vec::new(), Vec::new());
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(file);
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| InputError::new(path, Some(lineno + 1), None, format!("cannot read line: {e}")))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let text = line.trim_end_matches(['\n', '\r']);
        list.clear();
        // Without commas a line splits at spaces, unless the whole line is one class name
        // (a single label such as "traffic light").
        let whole = !text.contains(',') && index.contains_key(text.trim());
        let sep: &[char] = if text.contains(',') || whole { &[','] } else { &[' ', '\t'] };
        let mut offset = 0;
        for piece in text.split(sep) {
            let name = piece.trim();
            if !name.is_empty() {
                let start = offset + (piece.len() - piece.trim_start().len());
                let Some(&i) = index.get(name) else {
                    let col = text[..start].chars().count() + 1;
                    return Err(InputError::new(path, Some(lineno), Some(col), format!("unknown class {name:?}")));
                };
                list.push(i);
            }
            offset += piece.len() + 1;
        }
        co.add_image(&list, &mut scratch);
    }
    if lineno == 0 {
        return Err(InputError::new(path, None, None, "file is empty: no images"));
    }
    Ok(co)
}

/// One reference grouping: a group id per label for each graph the file gives.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceGroups {
    pub correlative: Option<Vec<usize>>,
    pub discriminative: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct GroupsEntry {
    correlative: Option<Vec<Vec<String>>>,
    discriminative: Option<Vec<Vec<String>>>,
}

/// Reads the groups for `t` from `{"T": {"correlative": [[names]], "discriminative": [[names]]}}`
/// (the official release's format). Every class must appear exactly once per graph.
pub fn read_reference_groups(path: &Path, classes: &[String], t: usize) -> Result<ReferenceGroups, InputError> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(InputError::new(path, None, None, "file is empty"));
    }
    let all: BTreeMap<String, GroupsEntry> = serde_json::from_str(&text).map_err(|e| serde_error(path, e))?;
    let key = t.to_string();
    let Some(entry) = all.get(&key) else {
        let have: Vec<&str> = all.keys().map(|s| s.as_str()).collect();
        return Err(InputError::new(
            path,
            None,
            None,
            format!("no groups for T = {t} (the file has T = {})", have.join(", ")),
        ));
    };
    let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let convert = |graph: &'static str, groups: &Vec<Vec<String>>| -> Result<Vec<usize>, InputError> {
        let mut out = vec![usize::MAX; classes.len()];
        for (g, members) in groups.iter().enumerate() {
            for (m, name) in members.iter().enumerate() {
                let at = [Step::Key(&key), Step::Key(graph), Step::Index(g), Step::Index(m)];
                let Some(&i) = index.get(name.as_str()) else {
                    return Err(json_error(
                        path,
                        &text,
                        &at,
                        format!("unknown class {name:?} in the {graph} groups"),
                    ));
                };
                if out[i] != usize::MAX {
                    return Err(json_error(path, &text, &at, format!("class {name:?} is in two {graph} groups")));
                }
                out[i] = g;
            }
        }
        if let Some(missing) = out.iter().position(|&g| g == usize::MAX) {
            return Err(json_error(
                path,
                &text,
                &[Step::Key(&key), Step::Key(graph)],
                format!("class {:?} is in no {graph} group", classes[missing]),
            ));
        }
        Ok(out)
    };
    Ok(ReferenceGroups {
        correlative: entry.correlative.as_ref().map(|g| convert("correlative", g)).transpose()?,
        discriminative: entry.discriminative.as_ref().map(|g| convert("discriminative", g)).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_points_at_nested_elements() {
        let text = "{\"a\": 1,\n \"m\": [[1, 2],\n  [3, \"x\"]]}";
        let pos = locate(text, &[Step::Key("m"), Step::Index(1), Step::Index(1)]);
        assert_eq!(line_col(text, pos), (3, 7));
        let pos = locate(text, &[Step::Key("m"), Step::Index(5)]);
        assert_eq!(line_col(text, pos), (2, 7));
    }
}
