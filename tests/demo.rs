//! The engine demo learns, and a CPU run is bit-reproducible from its seed.
use sd2::demo::{run, DemoConfig};

#[test]
fn demo_learns_and_is_reproducible() {
    let cfg = DemoConfig {
        steps: 120,
        test_size: 300,
        ..Default::default()
    };
    let a = run(&cfg, |_| {}).unwrap();
    println!(
        "loss {} → {}, accuracy {}",
        a.first_loss, a.final_loss, a.test_accuracy
    );
    assert!(
        a.final_loss < 0.6 * a.first_loss,
        "loss did not fall: {} → {}",
        a.first_loss,
        a.final_loss
    );
    assert!(
        a.test_accuracy > 0.5,
        "accuracy {} not above chance by a margin",
        a.test_accuracy
    );
    let b = run(&cfg, |_| {}).unwrap();
    assert_eq!(
        a.final_loss.to_bits(),
        b.final_loss.to_bits(),
        "same seed, different loss"
    );
    assert_eq!(a.confusion, b.confusion);
}
