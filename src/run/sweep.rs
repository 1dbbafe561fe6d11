//! `vitscope sweep`: every combination of the comma-separated `--set` values, trained
//! one after another, each into its own run directory under one folder named by its
//! settings (`norm=post,heads=6`). Runs that finished are skipped and stopped ones
//! resumed, so running the same sweep again continues where it stopped.

use std::path::Path;

/// One setting that varies: its key and values.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// `--set` arguments split into axes (values with commas) and fixed settings.
pub fn axes(sets: &[String]) -> Result<(Vec<Axis>, Vec<String>), String> {
    let (mut axes, mut fixed) = (Vec::new(), Vec::new());
    for set in sets {
        let Some((key, values)) = set.split_once('=') else {
            return Err(format!("`--set {set}`: expected KEY=VALUE or KEY=A,B,…"));
        };
        let (key, values) = (key.trim(), values.trim());
        if values.contains(',') && !values.starts_with('"') && !values.starts_with('[') {
            let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
            if values.iter().any(String::is_empty) {
                return Err(format!("`--set {set}`: an empty value in the list"));
            }
            if axes.iter().any(|a: &Axis| a.key == key) {
                return Err(format!("`--set {set}`: {key} is swept twice"));
            }
            axes.push(Axis {
                key: key.to_string(),
                values,
            });
        } else {
            fixed.push(set.clone());
        }
    }
    Ok((axes, fixed))
}

/// Every combination, the first axis varying slowest: (key, value) per axis.
pub fn combinations(axes: &[Axis]) -> Vec<Vec<(String, String)>> {
    axes.iter().fold(vec![Vec::new()], |acc, axis| {
        acc.into_iter()
            .flat_map(|combo| {
                axis.values.iter().map(move |v| {
                    let mut c = combo.clone();
                    c.push((axis.key.clone(), v.clone()));
                    c
                })
            })
            .collect()
    })
}

/// A run's folder name: `key=value` per axis, each key by its last part unless two
/// axes share it (`norm=post,heads=6`); characters a file name cannot hold become `_`.
pub fn run_name(combo: &[(String, String)]) -> String {
    let short = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let shared = |key: &str| combo.iter().filter(|(k, _)| short(k) == short(key)).count() > 1;
    let name = combo
        .iter()
        .map(|(k, v)| {
            let k = if shared(k) { k.clone() } else { short(k) };
            format!("{k}={}", v.trim_matches('"'))
        })
        .collect::<Vec<_>>()
        .join(",");
    name.chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Whether the run in `dir` trained to its end: its log's last "finished" line is not
/// a stop on request.
pub fn is_finished(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(super::dir::LOG_FILE)).is_ok_and(|log| {
        log.lines()
            .rev()
            .find(|l| l.contains("finished at step"))
            .is_some_and(|l| !l.contains("stopped on request"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn sets_with_lists_become_axes_and_their_product_named_runs() {
        let (axes, fixed) = axes(&sets(&[
            "model.norm=pre,post,none",
            "train.lr=1e-3",
            "model.heads=3, 6",
        ]))
        .unwrap();
        assert_eq!(fixed, sets(&["train.lr=1e-3"]));
        assert_eq!(axes.len(), 2);
        let combos = combinations(&axes);
        assert_eq!(combos.len(), 6);
        assert_eq!(run_name(&combos[0]), "norm=pre,heads=3");
        assert_eq!(run_name(&combos[5]), "norm=none,heads=6");
        assert_eq!(combinations(&[]), vec![Vec::new()]);
        // A key that would be ambiguous keeps its section.
        let same = vec![
            ("model.x".to_string(), "1".to_string()),
            ("data.x".to_string(), "a/b".to_string()),
        ];
        assert_eq!(run_name(&same), "model.x=1,data.x=a_b");
        assert!(super::axes(&sets(&["model.norm=pre,,post"])).is_err());
        assert!(super::axes(&sets(&["model.norm=pre,post", "model.norm=none,pre"])).is_err());
        assert!(super::axes(&sets(&["model.norm"])).is_err());
    }

    #[test]
    fn a_run_is_finished_only_when_its_log_says_so_last() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join(super::super::dir::LOG_FILE);
        assert!(!is_finished(tmp.path()));
        std::fs::write(&log, "t finished at step 20: stopped on request\n").unwrap();
        assert!(!is_finished(tmp.path()));
        std::fs::write(&log, "t finished at step 20: stopped on request\nt resumed\nt finished at step 40: all 2 epochs done\n").unwrap();
        assert!(is_finished(tmp.path()));
    }
}
