import Foundation
import Granary
import GranaryEngine
import GranaryCheck
import Synchronization

/// The workloads of `granary check run`: transactions whose reads reveal the order of writes
/// (Elle's list-append and rw-register), so that a checker can rebuild the dependency graph.
package enum CheckWorkload: String, CaseIterable, Sendable {
    /// Each transaction: a few `append(key, unique value)` and `read(key)` of whole lists.
    case listAppend = "list-append"
    /// Each transaction: a few `write(key, unique value)` and `read(key)` of registers.
    case rwRegister = "rw-register"
}

/// The faults `granary check run` can inject, each logged in the history with its time.
package enum CheckFault: String, CaseIterable, Sendable {
    /// Kill the whole cluster (SIGKILL of the process that runs it) and reopen it from its region
    /// files, with restart recovery. Needs the cluster in a child process (`granary check run`).
    case kill
    /// For a window, one node's coordinators see failed sends and reads (each of LOCK, its replies,
    /// VALIDATE, COMMIT-BACKUP, COMMIT-PRIMARY, ABORT and TRUNCATE fails with some probability):
    /// the exact-outcome paths.
    case faults
    /// For a window, one node is slowed: every send of its coordinators waits 200 us first, and
    /// every round of its record processing 100 us.
    case slow
    /// The process running the cluster is stopped (SIGSTOP) for 0.1-0.5 s, then continued, now
    /// and then. Needs the cluster in a child process (`granary check run`).
    case pause
    /// Every `faultInterval`, one node crashes (``Cluster/crash(_:)``, as SIGKILL would), as long
    /// as every region keeps a replica (at most replicas - 1 nodes): the configuration manager
    /// (10 ms leases, on for this fault) detects it and the survivors recover. Its clients stop,
    /// their last transaction's outcome unknown.
    case crash
}

/// What one run of clients (one cluster process's life, under `kill`) does.
package struct CheckRunOptions: Sendable {
    package var workload: CheckWorkload = .listAppend
    package var nodes = 3
    package var replicas = 3
    /// Client threads; client `c` runs its transactions on node `c % nodes`.
    package var clients = 6
    /// Keys in use at a time (a small key space: conflicts are frequent).
    package var activeKeys = 8
    /// Micro-operations per transaction, at most.
    package var maximumOperations = 4
    /// Elements a list-append key holds; a full key retires and the next one comes into use.
    package var listCapacity = 256
    /// Keys allocated for list-append (each `listCapacity` elements).
    package var totalKeys = 1_000
    package var seconds: Double = 10
    /// In-process faults (``CheckFault/faults``, ``CheckFault/slow``).
    package var faults: Set<CheckFault> = []
    /// Seconds between fault windows (each window lasts half of it).
    package var faultInterval: Double = 1
    /// Failure probability of each send or read inside a ``CheckFault/faults`` window.
    package var faultProbability: Double = 0.02
    /// A deliberately broken protocol (to show that the checker catches it).
    package var sabotage: ProtocolSabotage?
    package var seed: UInt64 = 1
    /// Client process ids start here (later lives of the cluster use new ids).
    package var processBase = 0
    /// Values written start above this (unique across lives of the cluster).
    package var valueBase = 0
    package var regionSize = 16 << 20
    /// Write each invoke to the history file before running its transaction (a process that
    /// may be killed must never leave a committed write without its invoke on file).
    package var flushInvokes = false

    package init() {}

    /// Cluster options for the run (the same on every reopen).
    package var clusterOptions: ClusterOptions {
        var options = ClusterOptions()
        options.regionSize = regionSize
        options.engine.maximumAttempts = 1_000
        options.engine.replyTimeout = .seconds(2)
        options.engine.sabotage = sabotage
        options.logger.logLevel = .critical
        if faults.contains(.crash) { options.membership = MembershipOptions() }
        return options
    }
}

/// What a run did.
package struct CheckRunSummary: Sendable {
    package var ok = 0
    package var failed = 0
    package var unknown = 0
    package var faults = 0
    /// The first error a transaction failed with (other than a full list-append key), for the summary.
    package var firstFailure: String?

    package init() {}
}

/// Objects of the workload: one per key, allocated when the cluster is created, their addresses
/// kept in the cluster directory (so a reopened cluster finds them).
package struct CheckKeys: Sendable {
    package var addresses: [GlobalAddress]

    package static let fileName = "check-keys.txt"

    /// Bytes of a key's object: a count, then the list's elements (list-append), or a register.
    static func objectBytes(_ options: CheckRunOptions) -> Int {
        options.workload == .listAppend ? 8 + 8 * options.listCapacity : 8
    }

    /// The keys of the cluster in `directory` (allocated and recorded there if it has none yet).
    package static func prepare(_ cluster: Cluster, directory: String?, options: CheckRunOptions) async throws -> CheckKeys {
        let path = directory.map { $0 + "/" + fileName }
        if let path, let text = try? String(contentsOfFile: path, encoding: .utf8) {
            let addresses = text.split(separator: "\n").compactMap { UInt64($0) }.map(GlobalAddress.init(rawValue:))
            if !addresses.isEmpty { return CheckKeys(addresses: addresses) }
        }
        let count = options.workload == .listAppend ? max(options.totalKeys, options.activeKeys) : options.activeKeys
        let zeros = [UInt8](repeating: 0, count: objectBytes(options))
        let perTransaction = max(1, 16_384 / zeros.count)
        var addresses: [GlobalAddress] = []
        // Before the history starts: a peer that does not answer in time (a node process still
        // busy starting, or a ring it reopened towards this client, which never saw the request)
        // is asked again, for up to 30 s, each time said on standard error. The allocation that
        // went unanswered did not commit (at most a slot stays reserved at its primary).
        let deadline = ContinuousClock.now + .seconds(30)
        while addresses.count < count {
            let node = cluster.nodes[addresses.count / perTransaction % cluster.nodes.count]
            let batch = min(perTransaction, count - addresses.count)
            do {
                addresses += try await node.transaction { tx in
                    try zeros.withUnsafeBytes { raw in try (0..<batch).map { _ in try tx.allocate(raw: raw) } }
                }
            } catch let error as TransactionError where ContinuousClock.now < deadline {
                switch error {
                case .peerUnresponsive, .transport:
                    FileHandle.standardError.write(Data("check: allocating the keys failed (\(error)); asking again\n".utf8))
                    try await Task.sleep(for: .milliseconds(50))
                default:
                    throw error
                }
            }
        }
        if let path {
            try addresses.map { String($0.rawValue) }.joined(separator: "\n").write(toFile: path + ".new", atomically: false, encoding: .utf8)
            guard rename(path + ".new", path) == 0 else { throw CheckRunError("cannot rename \(path).new") }
        }
        return CheckKeys(addresses: addresses)
    }
}

package struct CheckRunError: Error, CustomStringConvertible {
    package let description: String
    package init(_ description: String) { self.description = description }
}

/// A list-append key that is full: the transaction is refused (certainly not committed).
struct KeyFull: Error { let key: Int }

/// Runs the workload's clients on `cluster` for `options.seconds`, with the in-process faults,
/// recording every invocation and completion in `history`.
package enum CheckRunner {
    /// What the client threads and the nemesis share. `Sendable`: every field is an atomic or a mutex.
    final class Shared: Sendable {
        let nextValue: Atomic<Int>
        /// List-append keys found full (retired: the next ones come into use).
        let retired = Mutex<Set<Int>>([])
        let summary = Mutex(CheckRunSummary())
        let stop = Atomic<Bool>(false)
        init(valueBase: Int) { nextValue = Atomic(valueBase + 1) }
    }

    package static func run(_ cluster: Cluster, keys: CheckKeys, options: CheckRunOptions, history: HistoryWriter) async -> CheckRunSummary {
        let deadline = ContinuousClock.now + .milliseconds(Int(options.seconds * 1000))
        let shared = Shared(valueBase: options.valueBase)
        let nemesis = Thread { runNemesis(cluster, options: options, history: history, shared: shared) }
        nemesis.start()
        let clients = (0..<options.clients).map { client in
            Thread { runClient(client, cluster: cluster, keys: keys, options: options, history: history, deadline: deadline, shared: shared) }
        }
        for client in clients { client.start() }
        while clients.contains(where: { !$0.isFinished }) { try? await Task.sleep(for: .milliseconds(5)) }
        shared.stop.store(true, ordering: .relaxed)
        while !nemesis.isFinished { try? await Task.sleep(for: .milliseconds(5)) }
        for node in cluster.nodes {
            node.engine.injectFaults(nil)
            node.engine.slowRecordProcessing(microseconds: 0)
        }
        return shared.summary.withLock { $0 }
    }

    /// The in-process faults: every `faultInterval`, a window of one kind on one node, logged.
    private static func runNemesis(_ cluster: Cluster, options: CheckRunOptions, history: HistoryWriter, shared: Shared) {
        let kinds = options.faults.intersection([.faults, .slow, .crash]).sorted { $0.rawValue < $1.rawValue }
        guard !kinds.isEmpty else { return }
        var crashed = Set<Int>()
        var random = WorkloadRandom(seed: options.seed &+ 0xFA017)
        func pause(_ seconds: Double) {
            let until = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
            while ContinuousClock.now < until, !shared.stop.load(ordering: .relaxed) { usleep(2_000) }
        }
        while !shared.stop.load(ordering: .relaxed) {
            pause(options.faultInterval / 2)
            if shared.stop.load(ordering: .relaxed) { break }
            let kind = kinds[random.uniform(0...(kinds.count - 1))]
            let node = random.uniform(0...(cluster.nodes.count - 1))
            if kind == .crash {
                // The data survives as long as every region keeps a replica.
                guard crashed.count < options.replicas - 1, !crashed.contains(node) else { continue }
                crashed.insert(node)
                history.nemesis("crash", value: .int(node))
                cluster.crash(NodeID(node))
                shared.summary.withLock { $0.faults += 1 }
                pause(options.faultInterval / 2)
                continue
            }
            let engine = cluster.nodes[node].engine
            let probability = options.faultProbability
            let draws = SharedDraws(seed: random.next())
            history.nemesis("start-\(kind.rawValue)", value: .int(node))
            switch kind {
            case .faults: engine.injectFaults { _, _ in draws.next() < probability }
            case .slow:
                engine.injectFaults { _, _ in
                    usleep(200)
                    return false
                }
                engine.slowRecordProcessing(microseconds: 100)
            case .kill, .pause, .crash: break
            }
            shared.summary.withLock { $0.faults += 1 }
            pause(options.faultInterval / 2)
            engine.injectFaults(nil)
            engine.slowRecordProcessing(microseconds: 0)
            history.nemesis("stop-\(kind.rawValue)", value: .int(node))
        }
    }

    private static func runClient(_ client: Int, cluster: Cluster, keys: CheckKeys, options: CheckRunOptions, history: HistoryWriter,
                                  deadline: ContinuousClock.Instant, shared: Shared) {
        let node = cluster.nodes[client % cluster.nodes.count]
        let process = options.processBase + client
        var random = WorkloadRandom(seed: options.seed &* 0x100 &+ UInt64(client) &+ UInt64(options.processBase) << 20)
        while ContinuousClock.now < deadline {
            // The keys in use: the first `activeKeys` that have not retired.
            let active: [Int] = shared.retired.withLock { full in
                var active: [Int] = []
                var key = 0
                while active.count < options.activeKeys, key < keys.addresses.count {
                    if !full.contains(key) { active.append(key) }
                    key += 1
                }
                return active
            }
            if active.isEmpty { break }
            var ops: [MicroOp] = []
            for _ in 0..<(1 + random.uniform(0...(options.maximumOperations - 1))) {
                let key = active[random.uniform(0...(active.count - 1))]
                if random.uniform(0...1) == 0 {
                    ops.append(.read(key: key, value: nil))
                } else {
                    let value = shared.nextValue.add(1, ordering: .relaxed).oldValue
                    ops.append(options.workload == .listAppend ? .append(key: key, value: value) : .write(key: key, value: value))
                }
            }
            history.invoke(process: process, ops: ops)
            if options.flushInvokes { try? history.flush() }
            do {
                let done = try node.transactionSync { tx in try execute(ops, in: tx, keys: keys, options: options) }
                history.complete(process: process, type: .ok, ops: done)
                shared.summary.withLock { $0.ok += 1 }
            } catch TransactionError.outcomeUnknown {
                history.complete(process: process, type: .info, ops: nil)
                shared.summary.withLock { $0.unknown += 1 }
            } catch TransactionError.shutDown {
                // This client's node crashed: a killed process learns nothing more.
                history.complete(process: process, type: .info, ops: nil)
                shared.summary.withLock { $0.unknown += 1 }
                return
            } catch let full as KeyFull {
                history.complete(process: process, type: .fail, ops: nil)
                shared.summary.withLock { $0.failed += 1 }
                _ = shared.retired.withLock { $0.insert(full.key) }
            } catch {
                // Every other error is a certain failure: nothing of the transaction committed.
                history.complete(process: process, type: .fail, ops: nil)
                shared.summary.withLock { summary in
                    summary.failed += 1
                    if summary.firstFailure == nil { summary.firstFailure = "\(error)" }
                }
            }
        }
    }

    /// One attempt of a transaction's micro-ops: reads see the transaction's own earlier appends
    /// and writes; each key written is written once, at the end.
    static func execute(_ ops: [MicroOp], in tx: GranaryEngine.Transaction, keys: CheckKeys, options: CheckRunOptions) throws -> [MicroOp] {
        var lists: [Int: [Int]] = [:]
        var registers: [Int: Int] = [:]
        var written: [Int] = []
        var done: [MicroOp] = []
        done.reserveCapacity(ops.count)
        func list(_ key: Int) throws -> [Int] {
            if let known = lists[key] { return known }
            let elements = try withUnsafeTemporaryAllocation(byteCount: 8 + 8 * options.listCapacity, alignment: 8) { raw in
                try tx.read(keys.addresses[key], into: raw)
                let count = Int(raw.load(as: Int64.self))
                guard count >= 0, count <= options.listCapacity else {
                    throw CheckRunError("key \(key) holds a list of \(count) elements (capacity \(options.listCapacity))")
                }
                return (0..<count).map { Int(raw.load(fromByteOffset: 8 + 8 * $0, as: Int64.self)) }
            }
            lists[key] = elements
            return elements
        }
        func register(_ key: Int) throws -> Int {
            if let known = registers[key] { return known }
            let value = Int(try tx.read(keys.addresses[key], as: Int64.self))
            registers[key] = value
            return value
        }
        for op in ops {
            switch op {
            case .append(let key, let value):
                var elements = try list(key)
                guard elements.count < options.listCapacity else { throw KeyFull(key: key) }
                elements.append(value)
                lists[key] = elements
                if !written.contains(key) { written.append(key) }
                done.append(op)
            case .write(let key, let value):
                registers[key] = value
                if !written.contains(key) { written.append(key) }
                done.append(op)
            case .read(let key, _):
                if options.workload == .listAppend {
                    done.append(.read(key: key, value: .list(try list(key))))
                } else {
                    let value = try register(key)
                    done.append(.read(key: key, value: value == 0 ? nil : .register(value)))
                }
            }
        }
        for key in written {
            if options.workload == .listAppend {
                let elements = lists[key]!
                var bytes = [UInt8](repeating: 0, count: 8 + 8 * options.listCapacity)
                bytes.withUnsafeMutableBytes { raw in
                    raw.storeBytes(of: Int64(elements.count), as: Int64.self)
                    for (index, element) in elements.enumerated() { raw.storeBytes(of: Int64(element), toByteOffset: 8 + 8 * index, as: Int64.self) }
                }
                try bytes.withUnsafeBytes { try tx.write(keys.addresses[key], raw: $0) }
            } else {
                try tx.write(keys.addresses[key], Int64(registers[key]!))
            }
        }
        return done
    }
}

/// A splitmix64 stream shared by the threads that call a fault rule: each call draws one number
/// in [0, 1). `Sendable`: its state is one atomic.
final class SharedDraws: Sendable {
    private let state: Atomic<UInt64>
    init(seed: UInt64) { state = Atomic(seed) }
    func next() -> Double {
        let z = WorkloadRandom.mix(state.wrappingAdd(0x9E37_79B9_7F4A_7C15, ordering: .relaxed).newValue)
        return Double(z >> 11) / Double(UInt64(1) << 53)
    }
}
