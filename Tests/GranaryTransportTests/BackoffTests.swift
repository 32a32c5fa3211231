@testable import GranaryTransport
import Testing

@Suite("Backoff")
struct BackoffTests {
    /// The sleeps double from 2 us up to `maximumSleepMicroseconds`, whatever the maximum is (they
    /// were capped at 1,024 us before, so a waiter asking for 5 ms pauses polled five times as often).
    @Test("sleeps double up to the maximum asked for, above 1 ms too, and never past it")
    func sleepsReachTheMaximum() {
        for maximum: UInt32 in [100, 1_000, 5_000, 200_000] {
            var backoff = Backoff(spins: 2, yields: 1, maximumSleepMicroseconds: maximum)
            var sleeps: [UInt32] = []
            for _ in 0..<40 { sleeps.append(backoff.advance()) }
            #expect(sleeps.prefix(3) == [0, 0, 0], "spins and yields first: \(sleeps)")
            #expect(sleeps[3] == min(2, maximum), "the first sleep: \(sleeps)")
            #expect(sleeps.max() == maximum, "the longest sleep for a maximum of \(maximum) us: \(sleeps)")
            for (earlier, later) in zip(sleeps.dropFirst(3), sleeps.dropFirst(4)) {
                #expect(later == min(maximum, earlier * 2), "doubling up to \(maximum): \(sleeps)")
            }
        }
    }
}
