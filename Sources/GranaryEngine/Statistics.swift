import CoreMetrics
import GranaryMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The commit protocol's phases, as timers and counters name them.
public enum Phase: Int, Sendable, CaseIterable, CustomStringConvertible {
    /// A phase of a transaction, in the order it runs: `execute` (the body: reads, buffered
    /// writes), then the commit's LOCK, VALIDATE, COMMIT-BACKUP, COMMIT-PRIMARY and TRUNCATE (a
    /// read-only transaction runs only `execute`, and `validate` when it read more than one object).
    case execute, lock, validate, commitBackup, commitPrimary, truncate

    /// The phase's name in metrics (`execute`, `lock`, `validate`, `commit-backup`,
    /// `commit-primary`, `truncate`): the `phase` dimension of `granary_phase_nanoseconds`.
    public var description: String {
        switch self {
        case .execute: return "execute"
        case .lock: return "lock"
        case .validate: return "validate"
        case .commitBackup: return "commit-backup"
        case .commitPrimary: return "commit-primary"
        case .truncate: return "truncate"
        }
    }
}

/// The shard (0..<``threadShards``) of the calling thread, from its thread id: what a thread
/// updates on every commit lives in its shard, so that threads on different cores touch
/// different cache lines.
@inline(__always) func threadShard() -> Int {
    Int(truncatingIfNeeded: (UInt64(pthread_self()) &* 0x9E37_79B9_7F4A_7C15) >> 60)
}

/// The number of shards ``threadShard()`` picks from.
let threadShards = 16

/// A node's transaction counters: cheap atomics for in-process readers (benchmarks, tests), and the
/// same figures through swift-metrics for whatever backend the application bootstrapped.
///
/// Metric names: `granary_transactions_committed_total`, `granary_transactions_aborted_total`
/// (dimension `cause`), `granary_phase_nanoseconds` (timer, dimension `phase`),
/// `granary_records_rejected_total`; every one with dimension `node`.
///
/// The counters are striped: a thread adds to the stripe its thread id hashes to (16 stripes, each
/// on cache lines of its own), and a snapshot sums the stripes. Coordinators on different cores
/// then do not pass one counter line back and forth on every commit.
///
/// `@unchecked Sendable`: the counters are atomics in one block allocated at init and freed at deinit.
public final class EngineStatistics: @unchecked Sendable {
    // Layout of a stripe: committed, read-only, lock records, rejected, then aborts by cause raw
    // value (0...8), then nanoseconds per phase, then counts per phase; 32 words (4 lines).
    private static let committedIndex = 0, readOnlyIndex = 1, lockIndex = 2, rejectedIndex = 3
    private static let abortBase = 4, phaseNanosBase = 13, phaseCountBase = 19, total = 25
    private static let stripeWords = 32, stripes = threadShards
    private let counters: UnsafeMutablePointer<Atomic<Int>>

    /// The calling thread's copy of counter `index`.
    private func counter(_ index: Int) -> UnsafeMutablePointer<Atomic<Int>> {
        counters + (threadShard() * Self.stripeWords + index)
    }

    /// Counter `index` summed over the stripes.
    private func sum(_ index: Int) -> Int {
        (0..<Self.stripes).reduce(0) { $0 &+ (counters + ($1 * Self.stripeWords + index)).pointee.load(ordering: .relaxed) }
    }

    private let committedCounter: Counter
    private let abortCounters: [Counter]
    private let phaseTimers: [CoreMetrics.Timer]
    private let rejectedCounter: Counter
    /// Records and messages this node's mailbox handed to record processing (LOCK, COMMIT-BACKUP,
    /// COMMIT-PRIMARY, ... from every coordinator): its share of the cluster's work, also where
    /// clients coordinate. Counted once per poll round.
    private let processedCounter: Counter

    init(node: NodeID, factory: any MetricsFactory) {
        let dimension = [("node", node.description)]
        let words = Self.stripes * Self.stripeWords
        counters = UnsafeMutableRawPointer.allocate(byteCount: words * 8, alignment: 64).bindMemory(to: Atomic<Int>.self, capacity: words)
        for index in 0..<words { (counters + index).initialize(to: Atomic<Int>(0)) }
        committedCounter = Counter(label: "granary_transactions_committed_total", dimensions: dimension, factory: factory)
        abortCounters = (0...AbortCause.allCases.count).map { raw in
            Counter(label: "granary_transactions_aborted_total",
                    dimensions: dimension + [("cause", AbortCause(rawValue: UInt8(raw))?.description ?? "none")], factory: factory)
        }
        phaseTimers = Phase.allCases.map { phase in
            CoreMetrics.Timer(label: "granary_phase_nanoseconds", dimensions: dimension + [("phase", phase.description)], factory: factory)
        }
        rejectedCounter = Counter(label: "granary_records_rejected_total", dimensions: dimension, factory: factory)
        processedCounter = Counter(label: "granary_records_processed_total", dimensions: dimension, factory: factory)
    }

    deinit {
        counters.deinitialize(count: Self.stripes * Self.stripeWords)
        UnsafeMutableRawPointer(counters).deallocate()
    }

    func committed(readOnly: Bool) {
        counter(Self.committedIndex).pointee.add(1, ordering: .relaxed)
        if readOnly { counter(Self.readOnlyIndex).pointee.add(1, ordering: .relaxed) }
        committedCounter.increment()
    }

    func aborted(_ cause: AbortCause) {
        counter(Self.abortBase + Int(cause.rawValue)).pointee.add(1, ordering: .relaxed)
        abortCounters[Int(cause.rawValue)].increment()
    }

    func record(_ phase: Phase, nanoseconds: UInt64) {
        counter(Self.phaseNanosBase + phase.rawValue).pointee.add(Int(nanoseconds), ordering: .relaxed)
        counter(Self.phaseCountBase + phase.rawValue).pointee.add(1, ordering: .relaxed)
        phaseTimers[phase.rawValue].recordNanoseconds(Int64(nanoseconds))
    }

    func lockRecordSent() { counter(Self.lockIndex).pointee.add(1, ordering: .relaxed) }

    /// `count` records and messages were processed in one poll round.
    func processed(_ count: Int) { processedCounter.increment(by: Int64(count)) }

    func rejected() {
        counter(Self.rejectedIndex).pointee.add(1, ordering: .relaxed)
        rejectedCounter.increment()
    }

    /// A point-in-time copy of the counters.
    public struct Snapshot: Sendable, Equatable {
        /// Transactions this node coordinated that committed, read-only ones included.
        public var committed: Int
        /// Of ``committed``, the read-only transactions (no LOCK, no records: only reads, checked
        /// by VALIDATE when there were several).
        public var committedReadOnly: Int
        /// LOCK records sent by this node as coordinator.
        public var lockRecords: Int
        /// Records this node rejected (another configuration, malformed).
        public var rejectedRecords: Int
        /// Aborted attempts of this node's transactions, by cause (every cause present, 0 included);
        /// each was retried or ended in ``TransactionError/conflict(_:attempts:)``.
        public var aborts: [AbortCause: Int]
        /// Total time spent in each phase, in nanoseconds, over the attempts timed (one in
        /// ``EngineOptions/phaseTimingInterval``).
        public var phaseNanoseconds: [Phase: Int]
        /// How many timed attempts ran each phase: ``phaseNanoseconds`` divided by this is the
        /// phase's mean duration.
        public var phaseCounts: [Phase: Int]

        /// Aborted attempts of every cause together.
        public var totalAborts: Int { aborts.values.reduce(0, +) }
    }

    /// The counters now, summed over the stripes. Each counter is read on its own, so a snapshot
    /// taken while transactions run may be a few commits apart between figures.
    public var snapshot: Snapshot {
        var aborts: [AbortCause: Int] = [:]
        for cause in AbortCause.allCases { aborts[cause] = sum(Self.abortBase + Int(cause.rawValue)) }
        var nanos: [Phase: Int] = [:], counts: [Phase: Int] = [:]
        for phase in Phase.allCases {
            nanos[phase] = sum(Self.phaseNanosBase + phase.rawValue)
            counts[phase] = sum(Self.phaseCountBase + phase.rawValue)
        }
        return Snapshot(committed: sum(Self.committedIndex),
                        committedReadOnly: sum(Self.readOnlyIndex),
                        lockRecords: sum(Self.lockIndex),
                        rejectedRecords: sum(Self.rejectedIndex),
                        aborts: aborts, phaseNanoseconds: nanos, phaseCounts: counts)
    }
}
