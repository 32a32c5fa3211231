import Foundation
import GranaryMembership
import Synchronization
import Testing

/// The thread a member's reconfiguration and recovery run on (`ReconfigurationExecutor`).
@Suite("Reconfiguration executor")
struct ReconfigurationExecutorTests {
    /// Work that prefers the executor runs on its thread (not the cooperative pool's), at the
    /// raised priority where the process may raise it, also after a suspension; the thread ends
    /// once idle and the next job starts another.
    @Test("jobs run on the executor's own thread at its priority, across suspensions; an idle thread ends and the next job starts one")
    func runsOnItsThread() async throws {
        let executor = ReconfigurationExecutor(name: "granary-reconfiguration-test")
        #expect(!executor.hasThread, "a thread runs before any job")
        let outside = executor.isCurrent
        let seen = try await withTaskExecutorPreference(executor) {
            let first = (executor.isCurrent, getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0))
            try await Task.sleep(for: .milliseconds(2))
            let afterSleep = executor.isCurrent
            return (first.0, first.1, afterSleep)
        }
        #expect(!outside, "the test's own task claimed to run on the executor's thread")
        #expect(seen.0 && seen.2, "a job preferring the executor ran elsewhere (before the sleep: \(seen.0), after: \(seen.2))")
        // Raising the priority needs root (CAP_SYS_NICE); the CI runs as root.
        if geteuid() == 0 {
            #expect(seen.1 == ReconfigurationExecutor.niceness, "the executor's thread runs at nice \(seen.1), not \(ReconfigurationExecutor.niceness)")
        }
        let clock = ContinuousClock(), start = clock.now
        while executor.hasThread, clock.now - start < .seconds(5) { try await Task.sleep(for: .milliseconds(50)) }
        #expect(!executor.hasThread, "the thread still runs \(clock.now - start) after its last job (it ends after \(ReconfigurationExecutor.idleNanoseconds / 1_000_000) ms idle)")
        let again = await withTaskExecutorPreference(executor) { executor.isCurrent }
        #expect(again, "a job after the idle thread ended did not run on a new thread of the executor")
    }
}
