import ArgumentParser
import Foundation
import Granary
import Synchronization

/// `granary crash-load` (hidden; for the crash-restart tests): runs an embedded 3-node cluster in
/// `--directory` (reopening it, with restart recovery, when it exists) under a load whose every
/// acknowledged transaction can be checked after the process is killed at any moment.
///
/// Objects: `--counters` counters, allocated round-robin on the three nodes, and one sequence
/// object per worker. Worker w's k-th transaction reads its sequence object (k - 1), two counters
/// whose primaries differ, and writes both counters + 1 and the sequence object k; it prints
/// `ack w k` once committed (`unknown w k` for an unknown outcome). So after any crash:
/// sequence(w) >= the last k acknowledged, and the counters sum to twice the sequences' sum.
/// The addresses are in `crash-objects.txt` in the directory.
///
/// With `--allocators N`, N more threads each allocate objects of 200 bytes, one per transaction
/// (allocator a's k-th holds ``allocatedPayload(allocator:index:)``), printing `alloc a k ADDRESS`
/// once committed: with small regions (`--region-size`) the cluster adds regions on demand under
/// the load, and every acknowledged object must read back after any crash.
///
/// With `--manager` the cluster runs its configuration manager (10 ms leases) on the embedded
/// store, and with `--crash-node N` node N crashes (as SIGKILL would, ``Cluster/crash(_:)``)
/// `--crash-after-ms` into the load: the others recover without it and go on, so the kill of the
/// process lands after a recovery, and the reopen starts from the configuration the manager
/// committed last. A worker or allocator whose node no longer serves prints `stopped` and ends.
struct CrashLoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "crash-load", abstract: "Run a checkable load on an embedded cluster until killed (for crash tests).",
        shouldDisplay: false)

    @Option(help: "The cluster directory (created, or reopened with restart recovery).") var directory: String
    @Option(help: "Worker threads.") var workers: Int = 3
    @Option(help: "Counters.") var counters: Int = 12
    @Option(help: "Bytes per data region.") var regionSize: Int = Self.defaultRegionSize
    @Option(help: "Threads allocating objects (regions are added on demand when they fill).") var allocators: Int = 0
    @Flag(help: "Run the configuration manager (10 ms leases) on the embedded store.") var manager = false
    @Option(help: "With --manager: crash this node (0-2) --crash-after-ms into the load (-1: none).") var crashNode: Int = -1
    @Option(help: "Milliseconds of load before --crash-node crashes.") var crashAfterMs: Int = 100

    static let objectsFile = "crash-objects.txt"
    static let defaultRegionSize = 64 << 20

    /// The cluster options the load and the checker both use.
    static func options(regionSize: Int, manager: Bool = false) -> ClusterOptions {
        var options = ClusterOptions()
        options.regionSize = regionSize
        options.engine.maximumAttempts = 1_000_000
        options.logger.logLevel = .warning
        if manager {
            var membership = MembershipOptions()
            membership.lease = .milliseconds(10)
            // Suspicion after two expiries, as the recovery tests: on a 2-core host under this
            // load a lease thread is now and then a lease late.
            membership.probeLeases = 1
            options.membership = membership
        }
        return options
    }

    /// Whether `node` still serves (not crashed, not removed by the manager).
    static func serves(_ node: Node) -> Bool {
        node.isServing && crashing.load(ordering: .acquiring) != node.id.index
    }

    /// Reports a worker's or allocator's failed transaction: `stopped` (and true: the thread
    /// ends) when its node no longer serves, else `error`.
    static func stops(after error: any Error, _ thread: Int, on node: Node, say: (String) -> Void) -> Bool {
        let stopped = !serves(node)
        say(stopped ? "stopped \(thread) \(node.id): \(error)" : "error \(thread) \(error)")
        return stopped
    }

    /// The node `--crash-node` crashes, from the moment the crash begins (its membership stops
    /// before its engine does).
    static let crashing = Atomic<Int>(-1)

    func validate() throws {
        guard workers >= 1, workers <= 32 else { throw ValidationError("--workers is 1 to 32") }
        guard counters >= 2 else { throw ValidationError("--counters is at least 2") }
        guard allocators >= 0, allocators <= 32 else { throw ValidationError("--allocators is 0 to 32") }
        guard crashNode < 0 || (manager && crashNode < 3) else { throw ValidationError("--crash-node is 0 to 2, with --manager") }
    }

    func run() throws {
        let semaphore = DispatchSemaphore(value: 0)
        let failure = Mutex<(any Error)?>(nil)
        let directory = self.directory, workers = self.workers, counters = self.counters, regionSize = self.regionSize
        let allocators = self.allocators, manager = self.manager, crashNode = self.crashNode, crashAfterMs = self.crashAfterMs
        Task.detached {
            do {
                try await Self.load(directory: directory, workers: workers, counters: counters, regionSize: regionSize,
                                    allocators: allocators, manager: manager, crashNode: crashNode, crashAfterMs: crashAfterMs)
            } catch {
                failure.withLock { $0 = error }
            }
            semaphore.signal()
        }
        semaphore.wait()
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// The bytes of allocator `allocator`'s `index`-th object.
    static func allocatedPayload(allocator: Int, index: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: allocator &* 131 &+ index), count: 200)
        withUnsafeBytes(of: Int64(allocator << 40 | index).littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
        return bytes
    }

    static func load(directory: String, workers: Int, counters: Int, regionSize: Int, allocators: Int,
                     manager: Bool = false, crashNode: Int = -1, crashAfterMs: Int = 100) async throws {
        let start = ContinuousClock.now
        let cluster = try await Cluster.local(nodes: 3, replicas: 3, directory: .init(directory),
                                              options: options(regionSize: regionSize, manager: manager))
        let opened = ContinuousClock.now - start
        let path = directory + "/" + objectsFile
        var lines = (try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: "\n").map(String.init) ?? []
        if lines.isEmpty {
            var addresses: [String] = []
            for index in 0..<counters {
                let address = try await cluster.nodes[index % 3].transaction { try $0.allocate(Int64(0)) }
                addresses.append("counter \(address.rawValue)")
            }
            for worker in 0..<workers {
                let address = try await cluster.nodes[worker % 3].transaction { try $0.allocate(Int64(0)) }
                addresses.append("sequence \(address.rawValue)")
            }
            try addresses.joined(separator: "\n").write(toFile: path + ".new", atomically: false, encoding: .utf8)
            guard rename(path + ".new", path) == 0 else { throw CommandFailure("cannot rename \(path).new") }
            lines = addresses
        }
        let counterAddresses = lines.filter { $0.hasPrefix("counter ") }.compactMap { UInt64($0.dropFirst(8)) }.map(GlobalAddress.init(rawValue:))
        let sequences = lines.filter { $0.hasPrefix("sequence ") }.compactMap { UInt64($0.dropFirst(9)) }.map(GlobalAddress.init(rawValue:))
        let recovery = cluster.recovery.map { " \($0)" } ?? ""
        print("ready opened in \(opened.components.seconds * 1000 + opened.components.attoseconds / 1_000_000_000_000_000) ms;\(recovery)")
        fflush(nil)
        let output = Mutex(())
        /// One line of the transcript the crash tests read, whole and at once.
        @Sendable func say(_ line: String) {
            output.withLock { _ in
                print(line)
                fflush(nil)
            }
        }
        var threads: [Thread] = []
        for worker in 0..<min(workers, sequences.count) {
            let node = cluster.nodes[worker % 3]
            let sequence = sequences[worker]
            let thread = Thread {
                var random = SystemRandomNumberGenerator()
                while true {
                    let first = Int.random(in: 0..<counterAddresses.count, using: &random)
                    var second = Int.random(in: 0..<counterAddresses.count, using: &random)
                    while counterAddresses.count > 3, second % 3 == first % 3 { second = Int.random(in: 0..<counterAddresses.count, using: &random) }
                    do {
                        let done = try node.transactionSync { tx -> Int64 in
                            let next = try tx.read(sequence, as: Int64.self) + 1
                            try tx.write(counterAddresses[first], try tx.read(counterAddresses[first], as: Int64.self) + 1)
                            try tx.write(counterAddresses[second], try tx.read(counterAddresses[second], as: Int64.self) + 1)
                            try tx.write(sequence, next)
                            return next
                        }
                        say("ack \(worker) \(done)")
                    } catch TransactionError.outcomeUnknown(let reason) {
                        say("unknown \(worker) \(reason)")
                    } catch {
                        if Self.stops(after: error, worker, on: node, say: say) { return }
                    }
                }
            }
            thread.start()
            threads.append(thread)
        }
        for allocator in 0..<allocators {
            let node = cluster.nodes[allocator % 3]
            // Numbered after every object of an earlier life: a restarted allocator never reuses an index.
            let first = Int(Date().timeIntervalSince1970 * 1000) % (1 << 40)
            let thread = Thread {
                var index = first
                while true {
                    index += 1
                    do {
                        let address = try node.transactionSync { try $0.allocate(bytes: Self.allocatedPayload(allocator: allocator, index: index)) }
                        say("alloc \(allocator) \(index) \(address.rawValue)")
                    } catch TransactionError.outcomeUnknown(let reason) {
                        say("unknown \(allocator) \(reason)")
                    } catch {
                        if Self.stops(after: error, allocator, on: node, say: say) { return }
                    }
                }
            }
            thread.start()
            threads.append(thread)
        }
        if crashNode >= 0 {
            try await Task.sleep(for: .milliseconds(crashAfterMs))
            Self.crashing.store(crashNode, ordering: .releasing)
            cluster.crash(NodeID(crashNode))
            say("crashed n\(crashNode)")
        }
        while true { try await Task.sleep(for: .seconds(3600)) }
    }
}
