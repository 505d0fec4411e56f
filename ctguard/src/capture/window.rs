//! The pre-trigger ring and the capture schedule. Pure: times are
//! CLOCK_MONOTONIC nanoseconds passed in by the caller, so every case is
//! unit-tested.
//!
//! * [`PreRing`] keeps the most recent items (events, stat lines) for the
//!   pre-trigger window, bounded by age (`--pre`) and by count
//!   (`--pre-max-events`). Items pushed out by the count limit are counted so
//!   a summary can say how many of the window's events are missing.
//! * [`Schedule`] decides when triggers are armed, which window a capture
//!   covers (`[trigger - pre, trigger + post]`), when it closes, and the
//!   cooldown before the next one (`--cooldown`, counted from the end of the
//!   window, up to `--max-captures`).
use std::collections::VecDeque;

/// Recent items, oldest first, at most `span_ns` old and at most `max_items`.
#[derive(Debug)]
pub struct PreRing<T> {
    span_ns: u64,
    max_items: usize,
    items: VecDeque<(u64, T)>,
    /// Timestamps of items pushed out by the count limit, as
    /// (bucket start, count) runs of `bucket_ns`, oldest first.
    evicted: VecDeque<(u64, u64)>,
    bucket_ns: u64,
}

impl<T> PreRing<T> {
    pub fn new(span_ns: u64, max_items: usize) -> Self {
        // Evictions are remembered per bucket: at most ~4096 buckets per span,
        // never finer than 1 ms.
        let bucket_ns = (span_ns / 4096).max(1_000_000);
        PreRing { span_ns, max_items, items: VecDeque::new(), evicted: VecDeque::new(), bucket_ns }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds an item stamped `ts_ns` and forgets what is now too old or too many.
    pub fn push(&mut self, ts_ns: u64, item: T) {
        self.items.push_back((ts_ns, item));
        while self.items.len() > self.max_items {
            let Some((old, _)) = self.items.pop_front() else { break };
            self.note_evicted(old);
        }
        self.expire(ts_ns);
    }

    fn note_evicted(&mut self, ts_ns: u64) {
        let bucket = ts_ns - ts_ns % self.bucket_ns;
        match self.evicted.back_mut() {
            Some((b, n)) if *b == bucket => *n += 1,
            _ => self.evicted.push_back((bucket, 1)),
        }
    }

    /// Forgets items (and eviction records) older than `now_ns - span`.
    pub fn expire(&mut self, now_ns: u64) {
        let oldest = now_ns.saturating_sub(self.span_ns);
        while self.items.front().is_some_and(|(ts, _)| *ts < oldest) {
            self.items.pop_front();
        }
        while self.evicted.front().is_some_and(|(b, _)| b + self.bucket_ns <= oldest) {
            self.evicted.pop_front();
        }
    }

    /// Empties the ring: returns the items stamped `from_ns` or later, and
    /// how many items of that span the count limit pushed out (to the
    /// bucket's precision: a bucket straddling `from_ns` counts whole).
    pub fn take_since(&mut self, from_ns: u64) -> (Vec<(u64, T)>, u64) {
        let items = self.items.drain(..).filter(|(ts, _)| *ts >= from_ns).collect();
        let evicted = self.evicted.drain(..).filter(|(b, _)| b + self.bucket_ns > from_ns).map(|(_, n)| n).sum();
        (items, evicted)
    }
}

/// The span one capture covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// 1 for the first capture of the run.
    pub index: u32,
    pub start_ns: u64,
    pub trigger_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn contains(&self, ts_ns: u64) -> bool {
        ts_ns >= self.start_ns && ts_ns <= self.end_ns
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub pre_ns: u64,
    pub post_ns: u64,
    pub cooldown_ns: u64,
    pub max_captures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Triggers are evaluated.
    Armed,
    /// A capture is in progress.
    Recording(Window),
    /// Triggers are ignored until then.
    CoolingDown { until_ns: u64 },
    /// `max_captures` captures were taken.
    Done,
}

/// What [`Schedule::poll`] moved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The window ended: write its bundle.
    Closed(Window),
    /// The cooldown ended: counts since armed restart from zero.
    Rearmed,
}

/// Where an item stamped `ts` belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Into the capture being recorded.
    Capture,
    /// Into the pre-trigger ring (for a later capture).
    Ring,
}

#[derive(Debug)]
pub struct Schedule {
    cfg: ScheduleConfig,
    state: State,
    taken: u32,
    /// No capture starts after the one in progress (see [`Schedule::wind_down`]).
    last: bool,
}

impl Schedule {
    pub fn new(cfg: ScheduleConfig) -> Self {
        Schedule { cfg, state: if cfg.max_captures == 0 { State::Done } else { State::Armed }, taken: 0, last: false }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_armed(&self) -> bool {
        self.state == State::Armed
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Captures started so far.
    pub fn taken(&self) -> u32 {
        self.taken
    }

    pub fn recording(&self) -> Option<Window> {
        match self.state {
            State::Recording(w) => Some(w),
            _ => None,
        }
    }

    /// Where an item stamped `ts_ns` goes.
    pub fn route(&self, ts_ns: u64) -> Route {
        match self.state {
            State::Recording(w) if w.contains(ts_ns) => Route::Capture,
            _ => Route::Ring,
        }
    }

    /// A trigger held at `now_ns`: starts a capture when armed.
    pub fn fire(&mut self, now_ns: u64) -> Option<Window> {
        if self.state != State::Armed {
            return None;
        }
        self.taken += 1;
        let w = Window {
            index: self.taken,
            start_ns: now_ns.saturating_sub(self.cfg.pre_ns),
            trigger_ns: now_ns,
            end_ns: now_ns.saturating_add(self.cfg.post_ns),
        };
        self.state = State::Recording(w);
        Some(w)
    }

    /// Advances time: closes a window whose end has passed, re-arms after
    /// the cooldown.
    pub fn poll(&mut self, now_ns: u64) -> Option<Transition> {
        match self.state {
            State::Recording(w) if now_ns >= w.end_ns => {
                self.state = self.after(w.end_ns);
                Some(Transition::Closed(w))
            }
            State::CoolingDown { until_ns } if now_ns >= until_ns => {
                self.state = State::Armed;
                Some(Transition::Rearmed)
            }
            _ => None,
        }
    }

    /// No new capture from now on; a window in progress still runs to its
    /// end (the wrapped command exited).
    pub fn wind_down(&mut self) {
        self.last = true;
        if self.recording().is_none() {
            self.state = State::Done;
        }
    }

    /// Ends the run: a window in progress closes at `now_ns` (cut short),
    /// and nothing more will fire.
    pub fn stop(&mut self, now_ns: u64) -> Option<Window> {
        let closed = self.recording().map(|w| Window { end_ns: w.end_ns.min(now_ns), ..w });
        self.state = State::Done;
        closed
    }

    fn after(&self, end_ns: u64) -> State {
        if self.last || self.taken >= self.cfg.max_captures {
            State::Done
        } else if self.cfg.cooldown_ns == 0 {
            State::Armed
        } else {
            State::CoolingDown { until_ns: end_ns.saturating_add(self.cfg.cooldown_ns) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn ring_is_bounded_by_age() {
        let mut r = PreRing::new(10 * S, 1000);
        for t in 0..30 {
            r.push(t * S, t);
        }
        // Newest is 29 s: items from 19 s on are kept.
        assert_eq!(r.len(), 11);
        r.expire(35 * S);
        assert_eq!(r.len(), 5);
        let (items, evicted) = r.take_since(0);
        assert_eq!(items.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![25, 26, 27, 28, 29]);
        assert_eq!(evicted, 0, "age limits are not count evictions");
        assert!(r.is_empty());
    }

    #[test]
    fn ring_is_bounded_by_count_and_counts_what_it_pushed_out() {
        let mut r = PreRing::new(10 * S, 3);
        for i in 0..10u64 {
            r.push(S + i * 10_000_000, i); // one item every 10 ms
        }
        assert_eq!(r.len(), 3);
        let (items, evicted) = r.take_since(0);
        assert_eq!(items.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert_eq!(evicted, 7);
    }

    #[test]
    fn evictions_outside_the_window_are_not_counted() {
        let mut r = PreRing::new(10 * S, 2);
        for i in 0..5u64 {
            r.push(i * S, i); // evicts 0, 1, 2
        }
        let (items, evicted) = r.take_since(2 * S);
        assert_eq!(items.len(), 2);
        assert_eq!(evicted, 1, "only the item stamped 2 s falls in the window");
        // Eviction records age out with the ring.
        let mut r = PreRing::new(S, 1);
        r.push(0, 0);
        r.push(1, 1);
        r.push(5 * S, 2);
        assert_eq!(r.take_since(0).1, 0);
    }

    #[test]
    fn take_since_keeps_only_the_window() {
        let mut r = PreRing::new(100 * S, 100);
        for t in 0..10 {
            r.push(t * S, t);
        }
        let (items, _) = r.take_since(7 * S);
        assert_eq!(items.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert!(r.is_empty(), "taking empties the ring");
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut r = PreRing::new(10 * S, 0);
        r.push(S, 1);
        assert!(r.is_empty());
        assert_eq!(r.take_since(0).1, 1);
    }

    fn cfg(max: u32, cooldown_s: u64) -> ScheduleConfig {
        ScheduleConfig { pre_ns: 10 * S, post_ns: 20 * S, cooldown_ns: cooldown_s * S, max_captures: max }
    }

    #[test]
    fn one_capture_covers_pre_and_post() {
        let mut s = Schedule::new(cfg(1, 30));
        assert!(s.is_armed());
        assert_eq!(s.route(5 * S), Route::Ring);
        let w = s.fire(100 * S).unwrap();
        assert_eq!(w, Window { index: 1, start_ns: 90 * S, trigger_ns: 100 * S, end_ns: 120 * S });
        assert!(s.fire(101 * S).is_none(), "no second trigger while recording");
        assert_eq!(s.route(95 * S), Route::Capture);
        assert_eq!(s.route(120 * S), Route::Capture);
        assert_eq!(s.route(121 * S), Route::Ring);
        assert_eq!(s.route(89 * S), Route::Ring);
        assert_eq!(s.poll(119 * S), None);
        assert_eq!(s.poll(120 * S), Some(Transition::Closed(w)));
        assert!(s.is_done(), "max-captures 1");
        assert!(s.fire(200 * S).is_none());
    }

    #[test]
    fn cooldown_counts_from_the_end_of_the_window() {
        let mut s = Schedule::new(cfg(3, 30));
        s.fire(100 * S).unwrap();
        assert!(matches!(s.poll(121 * S), Some(Transition::Closed(_))));
        assert_eq!(s.state(), State::CoolingDown { until_ns: 150 * S });
        assert!(s.fire(140 * S).is_none(), "cooling down");
        assert_eq!(s.poll(149 * S), None);
        assert_eq!(s.poll(150 * S), Some(Transition::Rearmed));
        let w = s.fire(160 * S).unwrap();
        assert_eq!(w.index, 2);
        s.poll(180 * S);
        s.poll(210 * S);
        assert_eq!(s.fire(211 * S).unwrap().index, 3);
        s.poll(231 * S);
        assert!(s.is_done());
        assert_eq!(s.taken(), 3);
    }

    #[test]
    fn no_cooldown_rearms_at_once() {
        let mut s = Schedule::new(cfg(2, 0));
        s.fire(100 * S).unwrap();
        s.poll(120 * S);
        assert!(s.is_armed());
    }

    #[test]
    fn stopping_cuts_the_window_short() {
        let mut s = Schedule::new(cfg(1, 30));
        s.fire(100 * S).unwrap();
        let w = s.stop(105 * S).unwrap();
        assert_eq!((w.start_ns, w.end_ns), (90 * S, 105 * S));
        assert!(s.is_done());
        let mut idle = Schedule::new(cfg(1, 30));
        assert_eq!(idle.stop(5 * S), None);
    }

    #[test]
    fn winding_down_finishes_the_window_in_progress_only() {
        let mut s = Schedule::new(cfg(5, 0));
        s.fire(100 * S).unwrap();
        s.wind_down();
        assert!(s.recording().is_some(), "the post window goes on");
        assert_eq!(s.poll(110 * S), None);
        assert!(matches!(s.poll(120 * S), Some(Transition::Closed(_))));
        assert!(s.is_done(), "nothing fires after the command exited");
        let mut idle = Schedule::new(cfg(5, 0));
        idle.wind_down();
        assert!(idle.is_done());
    }

    #[test]
    fn early_triggers_start_the_window_at_zero() {
        let mut s = Schedule::new(cfg(1, 0));
        let w = s.fire(3 * S).unwrap();
        assert_eq!(w.start_ns, 0);
    }
}
