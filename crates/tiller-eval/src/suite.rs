//! Prompt suites: the testbed's held-out (`testbed-test`) and training (`testbed-train`) prompts,
//! grouped by task.

use std::collections::BTreeMap;
use tiller_core::{Error, Result};
use tiller_testbed::{Prompt, PromptSetConfig, Task, prompts};

/// The names [`suite`] accepts.
pub const SUITES: [&str; 2] = ["testbed-test", "testbed-train"];

/// The first `per_task` prompts of each task of suite `name` (all of them by default).
pub fn suite(name: &str, per_task: Option<usize>) -> Result<Vec<Prompt>> {
    let splits = prompts::generate_splits(&PromptSetConfig::default())?;
    let (list, n_default) = match name {
        "testbed-test" => (splits.test, PromptSetConfig::default().test_per_task),
        "testbed-train" => (splits.train, PromptSetConfig::default().train_per_task),
        other => {
            return Err(Error::invalid(format!(
                "unknown suite `{other}`; valid: {}",
                SUITES.join(", ")
            )));
        }
    };
    let n = per_task.unwrap_or(n_default).min(n_default);
    // The lists are grouped by task; keep the first n of each.
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    Ok(list
        .into_iter()
        .filter(|p| {
            let c = count.entry(p.spec.tag.name().to_string()).or_default();
            *c += 1;
            *c <= n
        })
        .collect())
}

/// The first `n` prompts of each task in `tasks` (lists are grouped by task).
pub fn first_per_task(list: &[Prompt], tasks: &[Task], n: usize) -> Vec<Prompt> {
    let mut count: BTreeMap<Task, usize> = BTreeMap::new();
    list.iter()
        .filter(|p| tasks.contains(&p.spec.tag))
        .filter(|p| {
            let c = count.entry(p.spec.tag).or_default();
            *c += 1;
            *c <= n
        })
        .cloned()
        .collect()
}
