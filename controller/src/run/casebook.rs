//! `CaseBook`: the one owner of a suite's per-case state — result, attempt,
//! losses, why it was re-run — and the pure decisions about it (what happens
//! to a case whose host was lost; what an unfinished case becomes).

use crate::report::CaseReport;

/// How many times a case may lose its host before it is given up: the first
/// try plus this many re-runs.
pub const MAX_INFRA_RETRIES: u32 = 2;

/// What becomes of a case whose host was lost under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLost {
    /// Place it again, as this attempt number.
    Requeue { attempt: u32 },
    /// Lost too often: it becomes an error.
    GiveUp,
}

/// Infrastructure loss is retried, test failures never. A case that was
/// never sent keeps its attempt number (it has not been tried); every loss
/// counts against the limit either way, so a host that keeps vanishing
/// cannot hold a case forever.
pub fn on_host_lost(attempt: u32, sent: bool, losses_before: u32) -> OnLost {
    if losses_before >= MAX_INFRA_RETRIES {
        return OnLost::GiveUp;
    }
    OnLost::Requeue { attempt: if sent { attempt + 1 } else { attempt } }
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    result: Option<CaseReport>,
    attempt: u32,
    losses: u32,
    /// Sent to a host and not yet back.
    in_flight: bool,
    reruns: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct CaseBook {
    suite: String,
    entries: Vec<Entry>,
}

impl CaseBook {
    pub fn new(suite: &str, names: impl IntoIterator<Item = String>) -> CaseBook {
        let entries = names
            .into_iter()
            .map(|name| Entry { name, result: None, attempt: 1, losses: 0, in_flight: false, reruns: Vec::new() })
            .collect();
        CaseBook { suite: suite.to_owned(), entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Cases with no result that no host is working on.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.entries.len()).filter(|i| self.entries[*i].result.is_none() && !self.entries[*i].in_flight).collect()
    }

    pub fn is_done(&self) -> bool {
        self.entries.iter().all(|e| e.result.is_some())
    }

    pub fn attempt(&self, case: usize) -> u32 {
        self.entries[case].attempt
    }

    pub fn name(&self, case: usize) -> &str {
        &self.entries[case].name
    }

    /// These cases went to a host.
    pub fn dispatch(&mut self, cases: &[usize]) {
        for i in cases {
            self.entries[*i].in_flight = true;
        }
    }

    /// These cases came back without a result and without a loss (lease busy,
    /// memory refused): they are pending again, attempt unchanged.
    pub fn returned(&mut self, cases: &[usize]) {
        for i in cases {
            self.entries[*i].in_flight = false;
        }
    }

    /// A case's result for its current attempt; the first one counts.
    pub fn finish(&mut self, case: usize, mut report: CaseReport) -> Option<&CaseReport> {
        let e = &mut self.entries[case];
        e.in_flight = false;
        if e.result.is_some() {
            return None;
        }
        report.suite = self.suite.clone();
        report.name = e.name.clone();
        report.attempt = e.attempt;
        report.reruns = e.reruns.clone();
        e.result = Some(report);
        e.result.as_ref()
    }

    /// The host under `case` was lost. Returns the decision; a given-up case
    /// has its error result already.
    pub fn lose(&mut self, case: usize, sent: bool, reason: &str) -> OnLost {
        let e = &mut self.entries[case];
        e.in_flight = false;
        if e.result.is_some() {
            return OnLost::GiveUp;
        }
        let decision = on_host_lost(e.attempt, sent, e.losses);
        e.losses += 1;
        e.reruns.push(reason.to_owned());
        match decision {
            OnLost::Requeue { attempt } => e.attempt = attempt,
            OnLost::GiveUp => {
                let message = format!("{reason} (gave up after {} lost attempts)", e.losses);
                let report = CaseReport::error(&self.suite, &e.name, message);
                self.finish(case, report);
            }
        }
        decision
    }

    /// Every case still without a result becomes an error with `message`;
    /// returns the cases this filled.
    pub fn fill_unfinished(&mut self, message: &str) -> Vec<usize> {
        let open: Vec<usize> = (0..self.entries.len()).filter(|i| self.entries[*i].result.is_none()).collect();
        for i in &open {
            let report = CaseReport::error(&self.suite, &self.entries[*i].name, message.to_owned());
            self.finish(*i, report);
        }
        open
    }

    pub fn result(&self, case: usize) -> Option<&CaseReport> {
        self.entries[case].result.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;

    #[test]
    fn a_lost_case_is_requeued_until_the_limit_and_only_a_sent_one_counts_as_a_new_attempt() {
        // (attempt, sent, losses before) → decision
        let table = [
            (1, true, 0, OnLost::Requeue { attempt: 2 }),
            (1, false, 0, OnLost::Requeue { attempt: 1 }),
            (2, true, 1, OnLost::Requeue { attempt: 3 }),
            (2, false, 1, OnLost::Requeue { attempt: 2 }),
            (3, true, 2, OnLost::GiveUp),
            (1, false, 2, OnLost::GiveUp),
        ];
        for (attempt, sent, losses, expected) in table {
            assert_eq!(
                on_host_lost(attempt, sent, losses),
                expected,
                "attempt {attempt}, sent {sent}, losses {losses}"
            );
        }
    }

    fn book() -> CaseBook {
        CaseBook::new("s", ["a".to_owned(), "b".to_owned()])
    }

    #[test]
    fn giving_up_after_two_re_runs_makes_an_error_that_lists_every_loss() {
        let mut b = book();
        for n in 1..=3 {
            b.dispatch(&[0]);
            let d = b.lose(0, true, &format!("host h{n} lost"));
            assert_eq!(d == OnLost::GiveUp, n == 3, "loss {n}");
        }
        let r = b.result(0).expect("given up");
        assert!(matches!(&r.outcome, Outcome::Error(m) if m.contains("gave up after 3 lost attempts")), "{r:?}");
        assert_eq!(r.reruns, ["host h1 lost", "host h2 lost", "host h3 lost"]);
        assert_eq!(r.attempt, 3);
        assert_eq!(b.pending(), [1]);
    }

    #[test]
    fn in_flight_cases_are_not_pending_and_a_second_result_is_ignored() {
        let mut b = book();
        b.dispatch(&[0, 1]);
        assert!(b.pending().is_empty());
        b.returned(&[1]);
        assert_eq!(b.pending(), [1]);
        assert!(b.finish(0, CaseReport::error("x", "y", "first".into())).is_some());
        assert!(b.finish(0, CaseReport::error("x", "y", "late".into())).is_none());
        assert!(matches!(&b.result(0).unwrap().outcome, Outcome::Error(m) if m == "first"));
        assert_eq!(b.result(0).unwrap().suite, "s", "the book names the suite, not the sender");
    }

    #[test]
    fn filling_unfinished_cases_leaves_results_alone_and_says_which_it_filled() {
        let mut b = book();
        b.finish(1, CaseReport::error("s", "b", "done".into()));
        assert_eq!(b.fill_unfinished("interrupted before the case ran"), [0]);
        assert!(b.is_done());
        assert!(matches!(&b.result(1).unwrap().outcome, Outcome::Error(m) if m == "done"));
    }

    #[test]
    fn a_requeued_case_keeps_why_it_was_re_run() {
        let mut b = book();
        b.dispatch(&[0]);
        assert_eq!(b.lose(0, false, "host a lost while loading"), OnLost::Requeue { attempt: 1 });
        b.dispatch(&[0]);
        let mut ok = CaseReport::error("s", "a", String::new());
        ok.outcome = Outcome::Passed;
        let r = b.finish(0, ok).unwrap();
        assert_eq!((r.attempt, r.reruns.clone()), (1, vec!["host a lost while loading".to_owned()]));
    }
}
