//! Thousands of seeded random schedules of the two-host world (`world/`), each checked
//! after every step for at most one holder (and the rest of DESIGN.md §5: forged
//! future-epoch messages refused whole, every claim under a new epoch), then healed and
//! checked for liveness.
//!
//! `FAILOVER_SIM_SEEDS=N` runs N seeds (default 3000); `FAILOVER_SIM_SEED=N` replays one
//! seed and prints its trace. This file must never skip a seed that fails.

mod world;

use std::time::Instant;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

/// Random events per seed: commands, faults, restarts, power cycles.
const CHAOS: u32 = 120;

#[test]
fn at_most_one_holder_over_thousands_of_seeded_schedules() {
    if let Some(seed) = env_u64("FAILOVER_SIM_SEED") {
        let (r, w) = world::run_seed(seed, CHAOS, true);
        println!("{}\n{:?}", w.trace_text(), w.tally);
        if let Err(e) = r {
            panic!("seed {seed} failed: {e}");
        }
        return;
    }
    let seeds = env_u64("FAILOVER_SIM_SEEDS").unwrap_or(3000);
    let started = Instant::now();
    let mut total = world::Tally::default();
    for seed in 0..seeds {
        let (r, w) = world::run_seed(seed, CHAOS, false);
        if let Err(e) = r {
            let (_, traced) = world::run_seed(seed, CHAOS, true);
            panic!(
                "seed {seed} failed: {e}\nreplay: FAILOVER_SIM_SEED={seed} cargo test -p failoverd-core --test simulation -- --nocapture\nlast steps:\n{}",
                traced.trace_text()
            );
        }
        total.add(&w.tally);
    }
    println!("{seeds} seeds in {:?}: {total:?}", started.elapsed());
    // The schedules must actually reach the interesting paths.
    for (what, n) in [
        ("takeovers", total.takeovers),
        ("forced promotes", total.forced),
        ("probe refusals", total.probe_refusals),
        ("leftovers kept", total.leftovers_kept),
        ("leftovers removed", total.leftovers_removed),
        ("drops at once", total.drops),
        ("claims", total.claims),
        ("future epochs refused", total.forged),
        ("address conflicts", total.conflicts),
    ] {
        assert!(
            n > 0 || seeds < 100,
            "no {what} in {seeds} seeds: the schedule misses a path"
        );
    }
}
