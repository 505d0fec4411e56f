fn main() -> anyhow::Result<()> {
    let s = ctguard::sensors::Sensors::start(&Default::default())?;
    println!("{:?}", s.layout);
    std::thread::sleep(std::time::Duration::from_secs(std::env::args().nth(1).map(|a| a.parse().unwrap()).unwrap_or(1)));
    let snap = s.snapshot()?;
    println!("{:?}", snap.counters);
    println!("{:?}", snap.drops);
    for (k, v) in snap.churn { println!("{k:?} {v:?}"); }
    Ok(())
}
