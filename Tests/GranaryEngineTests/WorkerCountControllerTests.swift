import GranaryWorkloads
import Testing

/// The bench runner's choice between all workers and one, fed with synthetic interval rates: a
/// machine on which one worker commits `oneRate` and all of them `allRate` per second.
@Suite("Worker count controller")
struct WorkerCountControllerTests {
    /// Runs `intervals` intervals; each interval's rate depends on how many workers the controller
    /// ran in it. Returns the counts it chose, interval by interval.
    static func simulate(maximum: Int = 2, intervals: Int, rate: (_ interval: Int, _ workers: Int) -> Double) -> [Int] {
        var controller = WorkerCountController(maximum: maximum)
        var running = maximum
        var chosen: [Int] = []
        for interval in 0..<intervals {
            chosen.append(running)
            running = controller.next(rate: rate(interval, running))
        }
        return chosen
    }

    @Test("keeps all workers when they commit more, after trying one once")
    func keepsAll() {
        let chosen = Self.simulate(intervals: 20) { _, workers in workers == 2 ? 900_000 : 550_000 }
        let ones = chosen.filter { $0 == 1 }.count
        #expect(ones == 1, "a trial far behind ends after one interval; ran one worker in \(ones) intervals: \(chosen)")
        #expect(chosen.suffix(10).allSatisfy { $0 == 2 }, "\(chosen)")
    }

    @Test("runs one worker when one commits more than all")
    func switchesToOne() {
        let chosen = Self.simulate(intervals: 20) { _, workers in workers == 2 ? 300_000 : 420_000 }
        #expect(chosen.suffix(14).filter { $0 == 1 }.count >= 12, "\(chosen)")
        #expect(chosen[0] == 2, "starts with all workers: \(chosen)")
    }

    @Test("a trial that is only somewhat behind runs its two intervals")
    func fullTrial() {
        let chosen = Self.simulate(intervals: 20) { _, workers in workers == 2 ? 500_000 : 450_000 }
        #expect(chosen.filter { $0 == 1 }.count == WorkerCountController.trialIntervals, "\(chosen)")
    }

    @Test("does not switch on a difference within the margin")
    func ignoresNoise() {
        let chosen = Self.simulate(intervals: 20) { _, workers in workers == 2 ? 500_000 : 510_000 }
        #expect(chosen.suffix(10).allSatisfy { $0 == 2 }, "\(chosen)")
    }

    @Test("follows the machine when the better configuration changes mid-run")
    func followsAShift() {
        // Near placement for 16 intervals (all workers faster), then far (one faster), then near.
        let chosen = Self.simulate(intervals: 60) { interval, workers in
            let far = interval >= 16 && interval < 40
            if workers == 1 { return 500_000 }
            return far ? 350_000 : 900_000
        }
        #expect(chosen[8..<16].allSatisfy { $0 == 2 }, "near at first: \(chosen)")
        #expect(chosen[24..<40].filter { $0 == 1 }.count >= 12, "far in the middle: \(chosen)")
        #expect(chosen[52..<60].filter { $0 == 2 }.count >= 6, "near again at the end: \(chosen)")
    }

    @Test("one worker thread: nothing to choose")
    func single() {
        let chosen = Self.simulate(maximum: 1, intervals: 10) { _, _ in 100 }
        #expect(chosen.allSatisfy { $0 == 1 })
    }
}
