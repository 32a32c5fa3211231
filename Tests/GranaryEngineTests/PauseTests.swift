import Foundation
import Granary
@testable import GranaryEngine
import GranaryMemory
import GranaryTestSupport
import Synchronization
import Testing

/// `Engine.pauseRecordProcessing(true)` stands for SIGSTOP in tests of waits on a paused peer:
/// once it returns, the node handles no record until it resumes, not even one that a poll
/// already under way (it had read the flag before the pause) finds in the ring.
@Suite("Pausing a node's record processing")
struct PauseTests {
    @Test("a LOCK sent once a pause has returned stays unhandled while a poll that started before the pause is still under way: the object is not locked until the node resumes",
          .timeLimit(.minutes(1)))
    func pauseWaitsForPollsUnderWay() async throws {
        let cluster = try await testCluster { options in
            options.engine.replyTimeout = .seconds(10)
            options.logger.logLevel = .critical
        }
        // Both objects are led by n2; n0's coordinators write them.
        let background = try await cluster.nodes[2].transaction { try $0.allocate(Int64(0)) }
        let x = try await cluster.nodes[2].transaction { try $0.allocate(Int64(-1)) }
        try await cluster.quiesce()
        let paused = cluster.nodes[2].engine
        let writer = cluster.nodes[0].engine
        // Each round of n2's record processing sleeps 20 ms under the claim of the lane it
        // serves, after it has read the pause flag: a pause usually lands while one is asleep.
        paused.slowRecordProcessing(microseconds: 20_000)
        let stop = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        // n0's records keep arriving in n2's log (the lane the test's LOCKs go through too).
        let traffic = Task.detached {
            await runThreads(1) { _ in
                var round: Int64 = 0
                while !stop.load(ordering: .relaxed) {
                    round += 1
                    do {
                        try writer.run { tx in try tx.write(background, round) }
                    } catch {
                        failures.withLock { $0.append("background round \(round): \(error)") }
                    }
                }
            }
        }
        var handledWhilePaused: [String] = []
        for round in 0..<6 {
            try await Task.sleep(for: .milliseconds(25))
            paused.pauseRecordProcessing(true)
            let value = Int64(round)
            let write = Task.detached { try writer.run { tx in try tx.write(x, value) } }
            // Longer than a round of processing that was asleep when the pause came.
            try await Task.sleep(for: .milliseconds(80))
            let header = primaryHeader(cluster, x)
            if header?.isLocked ?? false {
                handledWhilePaused.append("round \(round): x locked at its primary (\(header!)) while the write waits for n2")
            }
            paused.pauseRecordProcessing(false)
            do { try await write.value } catch { failures.withLock { $0.append("x round \(round): \(error)") } }
        }
        stop.store(true, ordering: .relaxed)
        await traffic.value
        paused.slowRecordProcessing(microseconds: 0)
        try await cluster.quiesce()
        #expect(handledWhilePaused.isEmpty, "n2 handled a LOCK sent after its pause had returned: \(handledWhilePaused)")
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(try await cluster.nodes[1].transaction { try $0.read(x, as: Int64.self) } == 5)
        try await cluster.shutdown()
    }

    /// `address`'s header at its primary.
    func primaryHeader(_ cluster: Cluster, _ address: GlobalAddress) -> ObjectHeader? {
        guard let primary = cluster.configuration.placement(of: address.region)?.primary,
              let region = cluster.nodes[primary.index].engine.replica(of: address.region) else { return nil }
        return ObjectLayout.loadHeader(region.base + Int(address.offset))
    }
}
