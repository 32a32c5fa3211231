import Foundation
import Granary
@testable import GranaryEngine
import GranaryMemory
import GranaryTestSupport
import Synchronization
import Testing

/// FaRM reserves log space before a commit starts. A commit whose records stay in receivers'
/// logs until TRUNCATE must never find a log full half-way, once it holds locks: it would wait,
/// holding them, for TRUNCATEs of other commits that may be waiting the same way.
@Suite("Log space promised before LOCK")
struct LogSpaceTests {
    /// A backup (n2) stops processing records: its 4 KiB log fills with the COMMIT-BACKUP and
    /// TRUNCATE records of transactions whose primaries are n0 and n1. A commit that went on to
    /// LOCK would then wait for room for its COMMIT-BACKUP holding locks on n0 and n1, and every
    /// reader of those objects would wait with it. With the space promised first, the commit
    /// waits before LOCK, holding nothing: readers go on.
    @Test("a backup's full log makes commits wait before LOCK, holding nothing: the objects stay readable, and no promise is left after",
          .timeLimit(.minutes(1)))
    func fullBackupLogHoldsNoLocks() async throws {
        let cluster = try await testCluster { options in
            options.ringCapacity = 4 << 10
            options.engine.truncationBatch = 1
            options.logger.logLevel = .critical
        }
        let payload = [UInt8](repeating: 1, count: 400)
        let x = try await cluster.nodes[0].transaction { try $0.allocate(bytes: payload) }
        let y = try await cluster.nodes[1].transaction { try $0.allocate(bytes: payload) }
        #expect(x.region != y.region)
        try await cluster.quiesce()
        let backup = cluster.nodes[2].engine
        backup.pauseRecordProcessing(true)
        let writer = cluster.nodes[0].engine
        let committed = Atomic<Int>(0)
        let failures = Mutex<[String]>([])
        let writing = Task.detached {
            await runThreads(1) { _ in
                for round in 0..<40 {
                    do {
                        try writer.run { tx in
                            try tx.write(x, bytes: [UInt8](repeating: UInt8(round % 200 + 2), count: 400))
                            try tx.write(y, bytes: [UInt8](repeating: UInt8(round % 200 + 2), count: 400))
                        }
                        committed.add(1, ordering: .relaxed)
                    } catch {
                        failures.withLock { $0.append("round \(round): \(error)") }
                    }
                }
            }
        }
        // Let the backup's log fill, then read both objects from n1 while it stays full.
        var readTimes: [Double] = []
        var lockedSeen: [String] = []
        for _ in 0..<20 {
            try await Task.sleep(for: .milliseconds(15))
            let start = ContinuousClock.now
            _ = try await cluster.nodes[1].transaction { tx in (try tx.read(x), try tx.read(y)) }
            let elapsed = ContinuousClock.now - start
            readTimes.append(Double(elapsed.components.attoseconds) / 1e15 + Double(elapsed.components.seconds) * 1000)
            for address in [x, y] {
                let primary = cluster.nodes[Int(address == x ? 0 : 1)].engine.replica(of: address.region)!
                let header = ObjectLayout.loadHeader(primary.base + Int(address.offset))
                if header.isLocked { lockedSeen.append("\(address): \(header)") }
            }
        }
        let duringPause = committed.load(ordering: .relaxed)
        backup.pauseRecordProcessing(false)
        await writing.value
        try await cluster.quiesce()
        let slowest = readTimes.max() ?? 0
        print("log space: \(duringPause) commits while the backup's log filled; reads of the objects took up to \(String(format: "%.1f", slowest)) ms; locked seen \(lockedSeen.count) times")
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(duringPause < 40, "every commit fit in the paused backup's log: the test did not fill it")
        // A commit that holds locks for a moment (between LOCK and COMMIT-PRIMARY) may be seen,
        // but not one waiting for room with them: reads stay fast and locks are not seen each time.
        #expect(slowest < 500, "a read of the objects waited \(slowest) ms while the backup's log was full (locked: \(lockedSeen.prefix(3)))")
        #expect(lockedSeen.count < 10, "the objects were seen locked in \(lockedSeen.count) of 20 looks: \(lockedSeen.prefix(3))")
        let values = try await cluster.nodes[2].transaction { tx in (try tx.read(x), try tx.read(y)) }
        #expect(values.0 == [UInt8](repeating: 39 % 200 + 2, count: 400) && values.1 == values.0, "the last round is not what the objects hold")
        for node in cluster.nodes {
            #expect(node.engine.promisedLogBytes == 0, "\(node.id)'s logs still promise \(node.engine.promisedLogBytes) bytes to commits that ended")
        }
        try await cluster.shutdown()
    }
}
