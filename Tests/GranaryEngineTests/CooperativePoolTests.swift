import Foundation
import Granary
import GranaryTestSupport
import Testing

/// `Node.transaction` in a server's cooperative pool: an attempt waiting for LOCK replies gives
/// its thread back after a short spin (``EngineOptions/lockWaitSpin``), so that transactions
/// waiting on a paused peer never stall the other tasks of the pool.
@Suite("Transactions in the cooperative pool")
struct CooperativePoolTests {
    /// Objects whose primary is n2, and a cluster whose LOCK replies time out only after 10 s.
    func clusterWithObjects(_ count: Int) async throws -> (Cluster, [GlobalAddress]) {
        let cluster = try await testCluster { options in
            options.engine.replyTimeout = .seconds(10)
            options.logger.logLevel = .critical
        }
        var objects: [GlobalAddress] = []
        for index in 0..<count { objects.append(try await cluster.nodes[2].transaction { try $0.allocate(Int64(index)) }) }
        try await cluster.quiesce()
        return (cluster, objects)
    }

    /// A task on the cooperative pool that sleeps 10 ms `beats` times and returns each gap
    /// between its wake-ups, in milliseconds.
    func heartbeat(beats: Int) -> Task<[Double], any Error> {
        Task {
            var gaps: [Double] = []
            var last = ContinuousClock.now
            for _ in 0..<beats {
                try await Task.sleep(for: .milliseconds(10))
                let now = ContinuousClock.now
                gaps.append(Double((now - last).components.attoseconds) / 1e15 + Double((now - last).components.seconds) * 1000)
                last = now
            }
            return gaps
        }
    }

    /// Resumes `paused`'s record processing, then waits for every writer (their errors, as text)
    /// and for the heartbeat (its gaps).
    func resume(_ paused: Engine, writers: [Task<Void, any Error>], heartbeat: Task<[Double], any Error>) async throws -> ([String], [Double]) {
        paused.pauseRecordProcessing(false)
        var failures: [String] = []
        for writer in writers {
            do { try await writer.value } catch { failures.append("\(error)") }
        }
        return (failures, try await heartbeat.value)
    }

    @Test("transactions waiting for a paused peer's LOCK answers leave the pool's threads free: a heartbeat task keeps its 10 ms period, and every transaction commits once the peer resumes")
    func heartbeatKeepsItsTiming() async throws {
        let pool = ProcessInfo.processInfo.activeProcessorCount
        let (cluster, objects) = try await clusterWithObjects(3 * pool)
        let coordinator = cluster.nodes[0]
        let paused = cluster.nodes[2].engine
        paused.pauseRecordProcessing(true)
        let heartbeat = heartbeat(beats: 100)
        // More waiting transactions than the pool has threads, each writing its own object.
        let writers = objects.enumerated().map { index, object in
            Task { try await coordinator.transaction { tx in try tx.write(object, Int64(1000 + index)) } }
        }
        try await Task.sleep(for: .milliseconds(600))
        let waited = writers.count
        let (failures, gaps) = try await resume(paused, writers: writers, heartbeat: heartbeat)
        let worst = gaps.max() ?? 0
        print("cooperative pool of \(pool): \(waited) transactions waited 600 ms on a paused primary; heartbeat (10 ms sleeps) worst gap \(Int(worst)) ms, median \(Int(gaps.sorted()[gaps.count / 2])) ms")
        #expect(failures.isEmpty, "transactions failed after the peer resumed: \(failures)")
        #expect(worst < 200, "a heartbeat on the pool stalled for \(Int(worst)) ms while transactions waited (gaps: \(gaps.map { Int($0) }))")
        let values = try await coordinator.transaction { tx in try objects.map { try tx.read($0, as: Int64.self) } }
        #expect(values == (0..<objects.count).map { Int64(1000 + $0) }, "values after the commits: \(values)")
        try await cluster.shutdown()
    }

    @Test("transactions whose primary's log is full (4 KiB rings, the primary paused) leave the pool's threads free: each attempt that finds no room for its LOCK ends and waits without a thread, a heartbeat task keeps its timing, and every transaction commits once the primary resumes")
    func fullLogLeavesThePoolFree() async throws {
        let pool = ProcessInfo.processInfo.activeProcessorCount
        let cluster = try await testCluster { options in
            options.ringCapacity = 4 << 10
            options.engine.replyTimeout = .seconds(10)
            options.logger.logLevel = .critical
        }
        let payload = [UInt8](repeating: 1, count: 400)
        var objects: [GlobalAddress] = []
        for _ in 0..<(8 * pool) { objects.append(try await cluster.nodes[2].transaction { try $0.allocate(bytes: payload) }) }
        try await cluster.quiesce()
        let coordinator = cluster.nodes[0]
        let paused = cluster.nodes[2].engine
        paused.pauseRecordProcessing(true)
        let heartbeat = heartbeat(beats: 60)
        // Far more LOCK bytes (8 x pool x 400) than three quarters of a 4 KiB ring hold.
        let writers = objects.enumerated().map { index, object in
            Task { try await coordinator.transaction { tx in try tx.write(object, bytes: [UInt8](repeating: UInt8(index % 200 + 2), count: 400)) } }
        }
        try await Task.sleep(for: .milliseconds(400))
        let (failures, gaps) = try await resume(paused, writers: writers, heartbeat: heartbeat)
        let worst = gaps.max() ?? 0
        let logFull = coordinator.statistics.aborts[.logFull] ?? 0
        print("cooperative pool of \(pool): \(writers.count) transactions on a paused primary's full 4 KiB log; \(logFull) attempts found no room; heartbeat worst gap \(Int(worst)) ms")
        #expect(failures.isEmpty, "transactions failed after the primary resumed: \(failures.prefix(3))")
        #expect(logFull > 0, "no attempt found the log full: the test did not fill it")
        #expect(worst < 200, "a heartbeat on the pool stalled for \(Int(worst)) ms while the log was full (gaps: \(gaps.map { Int($0) }))")
        #expect(coordinator.engine.promisedLogBytes == 0, "log space still promised after every commit ended: \(coordinator.engine.promisedLogBytes) bytes")
        let values = try await coordinator.transaction { tx in try objects.map { try tx.read($0) } }
        for (index, value) in values.enumerated() {
            #expect(value == [UInt8](repeating: UInt8(index % 200 + 2), count: 400), "object \(index) holds \(value.prefix(4))...")
        }
        try await cluster.shutdown()
    }

    @Test("a transaction waiting for a paused peer's LOCK answer, cancelled, ends at once with CancellationError; its LOCK is aborted, so nothing stays locked or written")
    func cancelledWhileWaiting() async throws {
        let (cluster, objects) = try await clusterWithObjects(1)
        let coordinator = cluster.nodes[0]
        let paused = cluster.nodes[2].engine
        paused.pauseRecordProcessing(true)
        let writer = Task { try await coordinator.transaction { tx in try tx.write(objects[0], Int64(77)) } }
        try await Task.sleep(for: .milliseconds(200))
        let cancelled = ContinuousClock.now
        writer.cancel()
        var outcome = "committed"
        do { try await writer.value } catch is CancellationError { outcome = "cancelled" } catch { outcome = "\(error)" }
        let ended = ContinuousClock.now - cancelled
        print("a transaction waiting on a paused primary ended \(ended) after its task was cancelled (reply timeout 10 s)")
        #expect(outcome == "cancelled", "the cancelled transaction ended with: \(outcome)")
        #expect(ended < .milliseconds(500), "it ended \(ended) after the cancellation")
        paused.pauseRecordProcessing(false)
        try await cluster.quiesce()
        // The primary got LOCK then ABORT: the object is unlocked and unchanged.
        let value = try await coordinator.transaction { tx -> Int64 in
            let value = try tx.read(objects[0], as: Int64.self)
            try tx.write(objects[0], value + 1)
            return value
        }
        #expect(value == 0, "the cancelled transaction's write is visible: \(value)")
        try await cluster.shutdown()
    }
}
