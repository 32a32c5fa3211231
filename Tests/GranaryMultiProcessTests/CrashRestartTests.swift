import Foundation
import Granary
@testable import GranaryCommand
import GranaryMemory
import GranaryTestSupport
import Testing

/// Whole-cluster crashes at random moments: a child process runs an embedded 3-node cluster under
/// a checkable transfer load (`granary crash-load`) and is SIGKILLed; this process reopens the
/// directory (restart recovery runs) and checks what survived, 20 times over. Its regions are
/// small (1 MiB) and an allocating thread fills them, so the kills also land while regions are
/// added on demand.
@Suite("Crash and restart")
struct CrashRestartTests {
    static let regionSize = 1 << 20

    @Test("SIGKILL at random moments, regions added on demand among them: every acknowledged transaction and allocation survives, none half applied, nothing locked, replicas equal")
    func killAndReopen() async throws {
        try await killAndReopen(rounds: 20, manager: false)
    }

    @Test("""
        with the configuration manager on (10 ms leases): a node crashes under the load in every other \
        life, the others recover without it, and the process is SIGKILLed after: each reopen starts \
        from the configuration committed last (the crashed node back as a member, its old replicas \
        set aside, new backups copied), and every acknowledged transaction and allocation survives, \
        none half applied, nothing locked, replicas equal once copied
        """, .timeLimit(.minutes(5)))
    func killAndReopenWithManager() async throws {
        try await killAndReopen(rounds: 10, manager: true)
    }

    func killAndReopen(rounds: Int, manager: Bool) async throws {
        let tmp = TemporaryDirectory("granary-crash")
        defer { tmp.remove() }
        let directory = tmp.path.appending("cluster").string
        let executable = try ChildProcess.granaryExecutable()
        var acknowledged: [Int: Int64] = [:]
        var reopenMilliseconds: [Double] = []
        var recoveredTransactions = 0
        var allocated: [(allocator: Int, index: Int, address: GlobalAddress)] = []
        var regionCounts: [Int] = []
        var generator = SystemRandomNumberGenerator()
        for round in 0..<rounds {
            var arguments = ["crash-load", "--directory", directory, "--workers", "2", "--allocators", "1", "--region-size", "\(Self.regionSize)"]
            // With the manager: in every other life a node crashes 30-200 ms into the load, each node in turn.
            let crashing = manager && round % 2 == 0
            if manager { arguments.append("--manager") }
            if crashing {
                arguments += ["--crash-node", "\(round / 2 % 3)", "--crash-after-ms", "\(Int.random(in: 30...200, using: &generator))"]
            }
            let child = try ChildProcess(executable, arguments)
            let ready = try child.readLine(until: { $0.hasPrefix("ready") }, timeout: 60)
            // Killed while transactions commit: at a random moment 50-600 ms into the load (after
            // the node's crash and the recovery from it: 300-900 ms).
            usleep(crashing ? UInt32.random(in: 300_000...900_000, using: &generator) : UInt32.random(in: 50_000...600_000, using: &generator))
            child.kill(SIGKILL)
            var unknown = 0
            var allocatedNow: [(allocator: Int, index: Int, address: GlobalAddress)] = []
            for line in child.transcript + child.remainingLines() {
                let parts = line.split(separator: " ")
                if parts.first == "ack", parts.count == 3, let worker = Int(parts[1]), let sequence = Int64(parts[2]) {
                    acknowledged[worker] = max(acknowledged[worker] ?? 0, sequence)
                } else if parts.first == "alloc", parts.count == 4, let allocator = Int(parts[1]), let index = Int(parts[2]),
                          let raw = UInt64(parts[3]) {
                    allocatedNow.append((allocator, index, GlobalAddress(rawValue: raw)))
                } else if parts.first == "unknown" {
                    unknown += 1
                } else if parts.first == "error" {
                    Issue.record("round \(round): the load reported \(line)")
                }
            }
            let start = ContinuousClock.now
            let cluster = try await Cluster.local(nodes: 3, replicas: 3, directory: .init(directory),
                                                  options: CrashLoadCommand.options(regionSize: Self.regionSize, manager: manager))
            let elapsed = ContinuousClock.now - start
            reopenMilliseconds.append(Double(elapsed.components.attoseconds) / 1e15 + Double(elapsed.components.seconds) * 1000)
            recoveredTransactions += cluster.recovery?.committed ?? 0
            let objects = try String(contentsOfFile: directory + "/" + CrashLoadCommand.objectsFile, encoding: .utf8).split(separator: "\n")
            let counters = objects.filter { $0.hasPrefix("counter ") }.compactMap { UInt64($0.dropFirst(8)) }.map(GlobalAddress.init(rawValue:))
            let sequences = objects.filter { $0.hasPrefix("sequence ") }.compactMap { UInt64($0.dropFirst(9)) }.map(GlobalAddress.init(rawValue:))
            // Nothing left locked: one transaction reads every object (a locked one fails it).
            let (counterValues, sequenceValues) = try await cluster.nodes[1].transaction { tx in
                (try counters.map { try tx.read($0, as: Int64.self) }, try sequences.map { try tx.read($0, as: Int64.self) })
            }
            let evidence = "round \(round) (\(ready)): acknowledged \(acknowledged.sorted { $0.key < $1.key }), sequences \(sequenceValues), counters \(counterValues), \(unknown) unknown outcomes"
            for (worker, sequence) in acknowledged {
                #expect(worker < sequenceValues.count && sequenceValues[worker] >= sequence,
                        "an acknowledged transaction was lost: \(evidence)")
                // At most the one transaction in flight at the kill committed unacknowledged.
                #expect(worker < sequenceValues.count && sequenceValues[worker] <= sequence + 1, "\(evidence)")
            }
            #expect(counterValues.reduce(0, +) == 2 * sequenceValues.reduce(0, +), "a transaction was half applied: \(evidence)")
            for (worker, value) in sequenceValues.enumerated() { acknowledged[worker] = max(acknowledged[worker] ?? 0, value) }
            // Every object acknowledged, in this life and the earlier ones: a slot handed out twice
            // (an allocation a new primary lacked, seen once) overwrites an earlier life's object.
            let sample = allocated + allocatedNow
            var lostAllocations: [String] = []
            for start in stride(from: 0, to: sample.count, by: 200) {
                let chunk = Array(sample[start..<min(start + 200, sample.count)])
                let values = try await cluster.nodes[0].transaction { tx in
                    try chunk.map { entry -> [UInt8]? in
                        do { return try tx.read(entry.address) } catch TransactionError.notAllocated { return nil }
                    }
                }
                for (entry, value) in zip(chunk, values) where value != CrashLoadCommand.allocatedPayload(allocator: entry.allocator, index: entry.index) {
                    lostAllocations.append("allocation \(entry.index) of allocator \(entry.allocator) at \(entry.address): \(value.map { "\($0.count) other bytes" } ?? "not allocated")")
                }
            }
            #expect(lostAllocations.isEmpty, "\(lostAllocations.count) acknowledged allocations lost, first \(lostAllocations.prefix(3)); \(cluster.configuration.regions.count) regions; \(evidence)")
            allocated += allocatedNow
            var configuration = cluster.configuration
            if manager {
                // Replicas are compared once the new backups have copied their regions.
                let deadline = ContinuousClock.now + .seconds(60)
                while true {
                    configuration = (cluster.servingNodes.first ?? cluster.nodes[0]).engine.configuration
                    if configuration.regions.allSatisfy({ $0.copying.isEmpty }) { break }
                    guard ContinuousClock.now < deadline else {
                        let states = zip(cluster.nodes, cluster.membership).map { node, service in
                            "\(node.id): in \(node.engine.configuration.id)\(service.isManager ? ", CM" : "")\(service.mustRejoin ? ", must rejoin" : "")"
                        }
                        Issue.record("round \(round): backups still copying after 60 s: \(configuration); reopened in \(cluster.configuration); \(states.joined(separator: "; "))")
                        break
                    }
                    try await Task.sleep(for: .milliseconds(10))
                }
            }
            regionCounts.append(configuration.regions.count)
            try await cluster.quiesce()
            var locked: [String] = []
            var differences: [String] = []
            for placement in configuration.regions {
                let replicas = placement.replicas.compactMap { cluster.nodes[$0.index].engine.replica(of: placement.region) }
                guard let primary = replicas.first else { continue }
                for (index, backup) in replicas.enumerated().dropFirst() where memcmp(primary.base, backup.base, primary.size) != 0 {
                    var offset = 0
                    while primary.base.load(fromByteOffset: offset, as: UInt8.self) == backup.base.load(fromByteOffset: offset, as: UInt8.self) { offset += 1 }
                    let line = offset & ~63
                    func words(_ base: UnsafeMutableRawPointer) -> String {
                        (0..<8).map { String(base.load(fromByteOffset: line + 8 * $0, as: UInt64.self), radix: 16) }.joined(separator: " ")
                    }
                    differences.append("\(placement.region): backup \(placement.replicas[index]) differs from primary \(placement.primary) first at offset \(offset): line \(line) primary [\(words(primary.base))] backup [\(words(backup.base))]")
                }
                for address in (counters + sequences) where address.region == placement.region {
                    for replica in replicas where ObjectLayout.loadHeader(replica.base + Int(address.offset)).isLocked {
                        locked.append("\(address)")
                    }
                }
            }
            #expect(locked.isEmpty, "locked after recovery: \(locked); \(evidence)")
            #expect(differences.isEmpty, "\(differences); \(evidence)")
            try await cluster.shutdown()
        }
        let mode = manager ? "crash-restart with the manager" : "crash-restart"
        print("\(mode): \(allocated.count) objects allocated, regions after each kill \(regionCounts)")
        // (With the manager, a node that comes back leads no region and allocates in the others':
        // whether the regions fill in 10 short lives depends on the timing.)
        #expect(manager || (regionCounts.last ?? 0) > regionCounts.first ?? 0, "no region was added on demand: \(regionCounts)")
        print("\(mode): \(rounds) kills; reopen with recovery took \(reopenMilliseconds.map { String(format: "%.0f", $0) }.joined(separator: ", ")) ms; \(recoveredTransactions) transactions rolled forward in all; final sequences \(acknowledged.sorted { $0.key < $1.key })")
        #expect(acknowledged.values.reduce(0, +) > 20, "the load committed almost nothing: \(acknowledged)")
    }
}
