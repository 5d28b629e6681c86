//! Choosing the home relay region from a history of reports (docs/protocols.md §4.5).
//! Pure: reports and `now` in, a region out. A region's score is its best latency over
//! the last five minutes (scaled by the relay map's `RegionScore`), and the home moves
//! only for a clear gain — at least 10 ms *and* more than a third faster — while the old
//! home still answers, so two similar regions never make it flap.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::defaults::{
    HOME_HEARD_RECENTLY, HOME_HISTORY, HOME_KEEP_WHEN_BLIND, HOME_SWITCH_MAX_RATIO,
    HOME_SWITCH_MIN_GAIN,
};

/// Bound on remembered reports (one every 20–26 s fills about 15 in five minutes).
const MAX_HISTORY: usize = 64;

/// Why the home region is what it is, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeReason {
    /// No region answered and there is no earlier home.
    NoneReachable,
    /// The first choice: the fastest region.
    Fastest,
    /// Moved: the new region is clearly faster.
    Switched { from: i32 },
    /// Stayed although `faster` measured lower: the gain is too small to move.
    KeptSimilar { faster: i32 },
    /// Nothing measured this time, but the home was heard from recently.
    KeptUnmeasured,
    /// Already the fastest.
    StillFastest,
}

/// Chooses and remembers the home region.
#[derive(Debug, Default)]
pub struct HomeChooser {
    history: VecDeque<(Instant, BTreeMap<i32, Duration>)>,
    home: Option<i32>,
    reason: Option<HomeReason>,
}

impl HomeChooser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current home region.
    pub fn home(&self) -> Option<i32> {
        self.home
    }

    /// Why the home is what it is.
    pub fn reason(&self) -> Option<HomeReason> {
        self.reason
    }

    /// Adds the latencies of a report made at `now` and returns the home region.
    /// `scores` are the relay map's `HomeParams.RegionScore`; `last_heard(region)` says
    /// when a relay frame last arrived from a region (the old home counts as reachable if
    /// that was within 8 s, even when its STUN probe went unanswered).
    pub fn update(
        &mut self,
        now: Instant,
        latencies: &BTreeMap<i32, Duration>,
        scores: &BTreeMap<i32, f64>,
        last_heard: impl Fn(i32) -> Option<Instant>,
    ) -> Option<i32> {
        self.history
            .retain(|(t, _)| now.saturating_duration_since(*t) <= HOME_HISTORY);
        if self.history.len() >= MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((now, latencies.clone()));

        let scale = |region: i32, d: Duration| match scores.get(&region) {
            Some(s) if *s > 0.0 => d.mul_f64(*s),
            _ => d,
        };
        let mut best_recent: BTreeMap<i32, Duration> = BTreeMap::new();
        for (_, lat) in &self.history {
            for (r, d) in lat {
                let d = scale(*r, *d);
                best_recent
                    .entry(*r)
                    .and_modify(|b| *b = (*b).min(d))
                    .or_insert(d);
            }
        }

        let old = self.home;
        if latencies.is_empty() {
            // Nothing measured: keep a home that was heard from lately; else none.
            let keep = old.filter(|h| {
                last_heard(*h)
                    .is_some_and(|t| now.saturating_duration_since(t) <= HOME_KEEP_WHEN_BLIND)
            });
            self.reason = Some(if keep.is_some() {
                HomeReason::KeptUnmeasured
            } else {
                HomeReason::NoneReachable
            });
            self.home = keep;
            return keep;
        }

        // The candidate: present in this report, lowest best-recent latency.
        let Some((candidate, best_any)) = latencies
            .keys()
            .filter_map(|r| best_recent.get(r).map(|d| (*r, *d)))
            .min_by_key(|(r, d)| (*d, *r))
        else {
            return old;
        };
        let Some(old_home) = old else {
            self.home = Some(candidate);
            self.reason = Some(HomeReason::Fastest);
            return self.home;
        };
        if candidate == old_home {
            self.reason = Some(HomeReason::StillFastest);
            return old;
        }
        let old_cur = latencies.get(&old_home).map(|d| scale(old_home, *d));
        let heard = last_heard(old_home)
            .is_some_and(|t| now.saturating_duration_since(t) <= HOME_HEARD_RECENTLY);
        if old_cur.is_some() || heard {
            let old_cur = old_cur.unwrap_or_default();
            let small_gain = old_cur.saturating_sub(best_any) < HOME_SWITCH_MIN_GAIN;
            let similar = best_any.as_secs_f64() > old_cur.as_secs_f64() * HOME_SWITCH_MAX_RATIO;
            if small_gain || similar {
                self.reason = Some(HomeReason::KeptSimilar { faster: candidate });
                return old;
            }
        }
        self.home = Some(candidate);
        self.reason = Some(HomeReason::Switched { from: old_home });
        self.home
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(v: &[(i32, u64)]) -> BTreeMap<i32, Duration> {
        v.iter()
            .map(|(r, ms)| (*r, Duration::from_millis(*ms)))
            .collect()
    }
    fn never(_: i32) -> Option<Instant> {
        None
    }
    const S: Duration = Duration::from_secs(25);

    #[test]
    fn first_choice_is_the_fastest() {
        let mut h = HomeChooser::new();
        let t = Instant::now();
        assert_eq!(
            h.update(t, &lat(&[(1, 20), (2, 80)]), &BTreeMap::new(), never),
            Some(1)
        );
        assert_eq!(h.reason(), Some(HomeReason::Fastest));
    }

    #[test]
    fn small_changes_do_not_move_the_home() {
        let mut h = HomeChooser::new();
        let mut t = Instant::now();
        let none = BTreeMap::new();
        h.update(t, &lat(&[(1, 20), (2, 25)]), &none, never);
        // Region 1 gets a bit slower than 2: 7 ms gain (< 10 ms) — stay.
        for _ in 0..20 {
            t += S;
            assert_eq!(
                h.update(t, &lat(&[(1, 27), (2, 20)]), &none, never),
                Some(1)
            );
        }
        assert_eq!(h.reason(), Some(HomeReason::KeptSimilar { faster: 2 }));
        // 30 ms vs 80 ms: ≥ 10 ms and > 33 % better — but the old home's best over the
        // last five minutes still counts for the candidate side only; switch.
        t += S;
        assert_eq!(
            h.update(t, &lat(&[(1, 80), (2, 30)]), &none, never),
            Some(2)
        );
        assert_eq!(h.reason(), Some(HomeReason::Switched { from: 1 }));
    }

    #[test]
    fn large_absolute_but_small_relative_gain_keeps_home() {
        let mut h = HomeChooser::new();
        let t = Instant::now();
        let none = BTreeMap::new();
        h.update(t, &lat(&[(1, 100), (2, 120)]), &none, never);
        // 2 now 80 vs 1 at 110: 30 ms faster but only 27 % — stay.
        assert_eq!(
            h.update(t + S, &lat(&[(1, 110), (2, 80)]), &none, never),
            Some(1)
        );
    }

    #[test]
    fn a_silent_old_home_is_left_unless_heard_from_recently() {
        let none = BTreeMap::new();
        let t = Instant::now();
        let mut h = HomeChooser::new();
        h.update(t, &lat(&[(1, 20), (2, 25)]), &none, never);
        // Region 1 did not answer this time; region 2 only 5 ms slower than 1 was.
        // Heard from region 1 two seconds ago: it is still reachable, stay.
        let heard = |r: i32| (r == 1).then(|| t + S - Duration::from_secs(2));
        assert_eq!(h.update(t + S, &lat(&[(2, 25)]), &none, heard), Some(1));
        // Not heard from: move.
        assert_eq!(h.update(t + 2 * S, &lat(&[(2, 25)]), &none, never), Some(2));
    }

    #[test]
    fn history_best_and_region_scores_count() {
        let t = Instant::now();
        let mut h = HomeChooser::new();
        // Region 2 is slower now but was fast a minute ago: its best-recent wins.
        h.update(t, &lat(&[(2, 10)]), &BTreeMap::new(), never);
        assert_eq!(
            h.update(t + S, &lat(&[(1, 30), (2, 40)]), &BTreeMap::new(), never),
            Some(2)
        );
        // A score of 0.5 makes region 1 (40 ms → 20) beat region 2 (30 ms).
        let mut h = HomeChooser::new();
        let scores = BTreeMap::from([(1, 0.5)]);
        assert_eq!(
            h.update(t, &lat(&[(1, 40), (2, 30)]), &scores, never),
            Some(1)
        );
    }

    #[test]
    fn blind_reports_keep_a_recently_heard_home_for_two_minutes() {
        let t = Instant::now();
        let mut h = HomeChooser::new();
        let none = BTreeMap::new();
        h.update(t, &lat(&[(1, 20)]), &none, never);
        let heard = |_| Some(t);
        assert_eq!(
            h.update(t + Duration::from_secs(100), &lat(&[]), &none, heard),
            Some(1)
        );
        assert_eq!(h.reason(), Some(HomeReason::KeptUnmeasured));
        assert_eq!(
            h.update(t + Duration::from_secs(130), &lat(&[]), &none, heard),
            None
        );
    }

    #[test]
    fn history_is_bounded_and_ages_out() {
        let mut t = Instant::now();
        let mut h = HomeChooser::new();
        let none = BTreeMap::new();
        h.update(t, &lat(&[(2, 5)]), &none, never);
        for _ in 0..200 {
            t += Duration::from_secs(1);
            h.update(t, &lat(&[(1, 30), (2, 60)]), &none, never);
        }
        assert!(h.history.len() <= MAX_HISTORY);
        // Region 2's 5 ms sample has aged out (more than 64 reports ago, and the bound
        // dropped it), so region 1 is clearly faster and takes over.
        assert_eq!(h.home(), Some(1));
    }
}
