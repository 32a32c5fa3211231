import Foundation
import Granary
import GranaryTestSupport
import Testing

/// Recovery's BLOCK step and coordinators waiting for LOCK answers (the fix for two nodes that
/// crash almost together: the second, silent but not yet removed, held the first recovery for
/// the whole reply timeout while a coordinator waited for its answer).
@Suite("LOCK waits and recovery's BLOCK")
struct LockWaitTests {
    @Test("a coordinator waiting for a silent primary's LOCK answer gives up its attempt as soon as a recovery blocks commits, not after the reply timeout")
    func lockWaitEndsWhenCommitsBlock() async throws {
        let cluster = try await testCluster { options in
            options.engine.replyTimeout = .seconds(3)
            options.engine.maximumAttempts = 1
            options.logger.logLevel = .critical
        }
        // An object whose primary is n2, then n2 stops answering (as a crashed process would,
        // before anyone has removed it).
        let object = try await cluster.nodes[2].transaction { try $0.allocate(Int64(1)) }
        try await cluster.quiesce()
        cluster.crash(NodeID(2))
        let coordinator = cluster.nodes[0].engine
        let abortsBefore = coordinator.statistics.snapshot.aborts[.wrongConfiguration] ?? 0
        let outcome = Shared<String?>(nil)
        let writer = Thread {
            do {
                try coordinator.run { tx in try tx.write(object, Int64(2)) }
                outcome.withLock { $0 = "committed" }
            } catch {
                outcome.withLock { $0 = "\(error)" }
            }
        }
        writer.start()
        // The LOCK is out and unanswered; a recovery (nobody removed yet) blocks commits.
        try await Task.sleep(for: .milliseconds(200))
        #expect(outcome.value == nil, "the write ended before the gate closed: \(outcome.value ?? "")")
        let closed = ContinuousClock.now
        coordinator.blockCommits(removing: [])
        var gaveUp: Duration?
        while ContinuousClock.now - closed < .seconds(5) {
            if (coordinator.statistics.snapshot.aborts[.wrongConfiguration] ?? 0) > abortsBefore {
                gaveUp = ContinuousClock.now - closed
                break
            }
            try await Task.sleep(for: .milliseconds(1))
        }
        print("LOCK wait: the attempt gave up \(gaveUp.map { "\($0)" } ?? "never") after the gate closed (reply timeout 3 s)")
        #expect(gaveUp.map { $0 < .milliseconds(500) } ?? false,
                "the waiting attempt did not give up within 500 ms of the gate closing: \(String(describing: gaveUp))")
        coordinator.unblockCommits()
        // Its next attempt waits for n2 again and ends at the reply timeout: no commit.
        while outcome.value == nil { try await Task.sleep(for: .milliseconds(10)) }
        #expect(outcome.value != "committed")
    }
}
