import CoreMetrics
import GranaryMemory
import Synchronization

/// The commit protocol's phases, as timers and counters name them.
public enum Phase: Int, Sendable, CaseIterable, CustomStringConvertible {
    case execute, lock, validate, commitBackup, commitPrimary, truncate

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

/// A node's transaction counters: cheap atomics for in-process readers (benchmarks, tests), and the
/// same figures through swift-metrics for whatever backend the application bootstrapped.
///
/// Metric names: `granary_transactions_committed_total`, `granary_transactions_aborted_total`
/// (dimension `cause`), `granary_phase_nanoseconds` (timer, dimension `phase`),
/// `granary_records_rejected_total` (dimension `reason`); every one with dimension `node`.
///
/// `@unchecked Sendable`: the counters are atomics in one block allocated at init and freed at deinit.
public final class EngineStatistics: @unchecked Sendable {
    // Layout of `counters`: committed, read-only, lock records, rejected, then aborts by cause raw
    // value (0...8), then nanoseconds per phase, then counts per phase.
    private static let committedIndex = 0, readOnlyIndex = 1, lockIndex = 2, rejectedIndex = 3
    private static let abortBase = 4, phaseNanosBase = 13, phaseCountBase = 19, total = 25
    private let counters: UnsafeMutablePointer<Atomic<Int>>
    private func counter(_ index: Int) -> UnsafeMutablePointer<Atomic<Int>> { counters + index }

    private let committedCounter: Counter
    private let abortCounters: [Counter]
    private let phaseTimers: [CoreMetrics.Timer]
    private let rejectedCounter: Counter

    init(node: NodeID, factory: any MetricsFactory) {
        let dimension = [("node", node.description)]
        counters = .allocate(capacity: Self.total)
        for index in 0..<Self.total { (counters + index).initialize(to: Atomic<Int>(0)) }
        committedCounter = Counter(label: "granary_transactions_committed_total", dimensions: dimension, factory: factory)
        abortCounters = (0...AbortCause.allCases.count).map { raw in
            Counter(label: "granary_transactions_aborted_total",
                    dimensions: dimension + [("cause", AbortCause(rawValue: UInt8(raw))?.description ?? "none")], factory: factory)
        }
        phaseTimers = Phase.allCases.map { phase in
            CoreMetrics.Timer(label: "granary_phase_nanoseconds", dimensions: dimension + [("phase", phase.description)], factory: factory)
        }
        rejectedCounter = Counter(label: "granary_records_rejected_total", dimensions: dimension, factory: factory)
    }

    deinit {
        counters.deinitialize(count: Self.total)
        counters.deallocate()
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

    func rejected() {
        counter(Self.rejectedIndex).pointee.add(1, ordering: .relaxed)
        rejectedCounter.increment()
    }

    /// A point-in-time copy of the counters.
    public struct Snapshot: Sendable, Equatable {
        public var committed: Int
        public var committedReadOnly: Int
        /// LOCK records sent by this node as coordinator.
        public var lockRecords: Int
        /// Records this node rejected (another configuration, malformed).
        public var rejectedRecords: Int
        public var aborts: [AbortCause: Int]
        /// Total time spent in each phase, and how many times the phase ran.
        public var phaseNanoseconds: [Phase: Int]
        public var phaseCounts: [Phase: Int]

        public var totalAborts: Int { aborts.values.reduce(0, +) }
    }

    public var snapshot: Snapshot {
        var aborts: [AbortCause: Int] = [:]
        for cause in AbortCause.allCases { aborts[cause] = counter(Self.abortBase + Int(cause.rawValue)).pointee.load(ordering: .relaxed) }
        var nanos: [Phase: Int] = [:], counts: [Phase: Int] = [:]
        for phase in Phase.allCases {
            nanos[phase] = counter(Self.phaseNanosBase + phase.rawValue).pointee.load(ordering: .relaxed)
            counts[phase] = counter(Self.phaseCountBase + phase.rawValue).pointee.load(ordering: .relaxed)
        }
        return Snapshot(committed: counter(Self.committedIndex).pointee.load(ordering: .relaxed),
                        committedReadOnly: counter(Self.readOnlyIndex).pointee.load(ordering: .relaxed),
                        lockRecords: counter(Self.lockIndex).pointee.load(ordering: .relaxed),
                        rejectedRecords: counter(Self.rejectedIndex).pointee.load(ordering: .relaxed),
                        aborts: aborts, phaseNanoseconds: nanos, phaseCounts: counts)
    }
}
