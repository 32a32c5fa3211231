import Granary
import Histogram
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A workload the benchmark harness can drive: it loads its data, then runs transactions.
package protocol Workload: Sendable {
    /// The transaction types it mixes, for per-type reporting.
    var transactionTypes: [String] { get }
    /// Creates the workload's data in `cluster`.
    mutating func load(into cluster: Cluster) async throws
    /// Runs one transaction of the mix on `node` (the body of one attempt: it may run again).
    func runOne(on node: Node, transaction: Transaction, random: inout WorkloadRandom) throws -> TransactionOutcome
    /// Checks the workload's invariant after a run, given the sum of the committed transactions'
    /// deltas and the deltas of those whose outcome no one was told (``InDoubt``); returns the
    /// violations found (empty if none).
    func check(_ cluster: Cluster, committedDelta: Int64, inDoubt: [Int64]) async throws -> [String]
}

/// Transactions whose outcome the run was not told: their commit failed with
/// `TransactionError.outcomeUnknown`, or their coordinator was crashed (`--crash`) after their
/// body ran. Recovery commits each on every replica or on none, so the data may show any subset
/// of them, and an invariant check must accept exactly those states.
package enum InDoubt {
    /// Whether `difference` (observed minus expected from the committed transactions) is the sum of
    /// some subset of `deltas`. Exact up to 20 transactions with a non-zero delta; beyond, the
    /// range between the sums of the negative and of the positive deltas.
    package static func explains(_ difference: Int64, by deltas: [Int64]) -> Bool {
        let nonZero = deltas.filter { $0 != 0 }
        if difference == 0 { return true }
        guard nonZero.count <= 20 else {
            let low = nonZero.filter { $0 < 0 }.reduce(0, +), high = nonZero.filter { $0 > 0 }.reduce(0, +)
            return (low...high).contains(difference)
        }
        var sums: Set<Int64> = [0]
        for delta in nonZero { sums.formUnion(sums.map { $0 &+ delta }) }
        return sums.contains(difference)
    }

    /// "; N transactions in doubt (deltas ...)" for a violation's message, or "".
    package static func describe(_ deltas: [Int64]) -> String {
        deltas.isEmpty ? "" : "; \(deltas.count) transactions in doubt, none of whose subsets explains it (deltas \(deltas.prefix(20).map(String.init).joined(separator: ", ")))"
    }
}

/// What one committed transaction of a workload did.
package struct TransactionOutcome: Sendable {
    /// Index of its type in ``Workload/transactionTypes``.
    package var type: Int
    /// A workload-defined change the invariant check accounts for (money added, rows inserted).
    package var delta: Int64
    /// Whether the transaction found what it looked for (TATP counts "not found" as completed).
    package var succeeded: Bool

    package init(type: Int, delta: Int64 = 0, succeeded: Bool = true) {
        self.type = type
        self.delta = delta
        self.succeeded = succeeded
    }
}

/// SplitMix64: small, fast and reproducible from a seed.
package struct WorkloadRandom: RandomNumberGenerator, Sendable {
    package var state: UInt64
    /// A generator whose stream is unrelated to that of any nearby seed. (SplitMix64 walks one
    /// fixed sequence; starting at `seed * gamma` would make the streams of seeds s and s + k the
    /// same sequence k steps apart, so one worker would replay another's transactions.)
    package init(seed: UInt64) { state = Self.mix(seed &+ 0x2545_F491_4F6C_DD1D) }
    package mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return Self.mix(state)
    }
    /// SplitMix64's output function.
    @inline(__always) static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in `range`.
    package mutating func uniform(_ range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.count))
    }
}

/// What a run measured.
package struct RunReport: Sendable, Codable {
    package struct TypeFigures: Sendable, Codable {
        package var name: String
        package var committed: Int
        package var perSecond: Double
        /// Of the committed, how many found what they looked for.
        package var succeeded: Int
        /// This type's latency from first attempt to commit: "p50", "p90", "p99", "p99.9".
        package var latencyNanoseconds: [String: UInt64]? = nil
    }
    package var seconds: Double
    package var committed: Int
    package var committedPerSecond: Double
    package var attempts: Int
    package var aborts: [String: Int]
    package var abortRate: Double
    package var latencyNanoseconds: [String: UInt64]  // "p50", "p90", "p99", "p99.9"
    package var byType: [TypeFigures]
    /// Mean nanoseconds per transaction spent in each protocol phase (where it ran).
    package var phaseMeanNanoseconds: [String: Double]
    /// Committed per second in each interval of the run (for plots), every ``intervalSeconds``.
    package var timeline: [Double]
    /// The length of one ``timeline`` interval.
    package var intervalSeconds: Double = 0.25
    /// (latency ns, cumulative fraction) points of the latency CDF, dense in the tail (every
    /// percent to 99, every 0.1 to 99.9, every 0.01 to 99.99, then 100).
    package var latencyCDF: [[Double]]
    /// Sum of the committed transactions' deltas.
    package var committedDelta: Int64
    /// The deltas of the transactions in doubt (``InDoubt``).
    package var inDoubtDeltas: [Int64] = []
    /// Transactions given up after the attempt limit, or failed with a non-retryable error.
    package var failed: Int
    /// Worker threads started.
    package var workers: Int = 0
    /// Whether ``WorkerCountController`` chose how many of them ran (see ``Runner/run(_:on:workers:adaptive:seconds:seed:progress:)``).
    package var adaptiveWorkers: Bool = false
    /// How many workers were running in each interval of ``timeline``.
    package var activeWorkers: [Int] = []
    /// With a crash plan: transactions committed in each millisecond of the run, and the index of
    /// the millisecond in which the node was crashed (monotonic time of the crash in
    /// `crashNanoseconds`).
    package var millisecondBins: [Int]? = nil
    package var crashBin: Int? = nil
    package var crashNanoseconds: UInt64? = nil
}

/// Chooses how many of a run's worker threads issue transactions: all of them, or one.
///
/// Two workers on two cores share every node's rings, locks, record processors and objects, so
/// every shared line they write crosses between their cores. Where the host places the two
/// virtual CPUs far apart (a cache-line handoff of 200-300 ns instead of 30-90), that traffic costs
/// more than the second core gives on write-heavy workloads: measured on 2026-11-25, SmallBank ran
/// at 483,542/s with two workers and 527,865-565,242/s with one; transfer at 283-313 K with two and
/// 407-427 K with one; TATP (mostly reads) stayed faster with two (990 K-1.1 M against 752-892 K).
/// So the choice is made by measuring, not by rule:
/// - the first interval (warm-up) is ignored;
/// - the other configuration is tried for ``trialIntervals`` intervals and kept if it ran more than
///   ``margin`` faster than the current one's last two intervals (a trial whose first interval is
///   below ``abandon`` times them ends after it);
/// - the first trial follows the warm-up; the next one interval after the current configuration's
///   last two intervals moved by more than ``shift`` from the two before (the host moved the CPUs;
///   the extra interval makes the baseline two intervals after the move), and
///   otherwise every ``reprobeIntervalsWithAll`` intervals while all workers run, every
///   ``reprobeIntervalsWithOne`` while one does (one worker's rate does not show where the CPUs
///   are, so only trying tells).
///
/// Intervals are the runner's progress intervals (250 ms). Not thread-safe: the sampler thread
/// owns it.
package struct WorkerCountController: Sendable {
    package let maximum: Int
    /// The configuration believed faster.
    package private(set) var current: Int
    /// The rates of the trial under way (its configuration is the other one).
    private var trialRates: [Double]?
    /// Rates of `current`'s intervals since the last decision, newest last (at most four).
    private var recent: [Double] = []
    private var intervals = 0
    private var lastDecision = 0
    private var trialAfterNext = false
    package static let margin = 1.05
    package static let abandon = 0.8
    package static let shift = 0.25
    package static let trialIntervals = 2
    package static let reprobeIntervalsWithAll = 24
    package static let reprobeIntervalsWithOne = 12

    package init(maximum: Int) {
        precondition(maximum >= 1)
        self.maximum = maximum
        self.current = maximum
    }

    /// The configuration being tried, if a trial is under way.
    package var trial: Int? { trialRates == nil ? nil : other }

    private var other: Int { current == maximum ? 1 : maximum }

    private static func mean(_ rates: ArraySlice<Double>) -> Double { rates.reduce(0, +) / Double(max(1, rates.count)) }

    /// Takes the committed/s of the interval that just ended (run with the count this returned
    /// last time, `maximum` at first) and returns how many workers run in the next one.
    package mutating func next(rate: Double) -> Int {
        intervals += 1
        guard maximum > 1 else { return current }
        if var rates = trialRates {
            rates.append(rate)
            // A trial far behind after its first interval ends there (in near placement one
            // worker runs at about 60% of two; the second interval would only cost).
            let clearlyWorse = rate < Self.mean(recent.suffix(2)) * Self.abandon
            if rates.count < Self.trialIntervals, !clearlyWorse {
                trialRates = rates
                return other
            }
            trialRates = nil
            lastDecision = intervals
            let baseline = Self.mean(recent.suffix(2))
            if Self.mean(rates[...]) > baseline * Self.margin {
                current = other
                recent = Array(rates.suffix(2))
            }
            return current
        }
        if intervals == 1 { return current }  // warm-up
        recent.append(rate)
        if recent.count > 4 { recent.removeFirst() }
        let moved = !trialAfterNext && recent.count == 4
            && abs(Self.mean(recent.suffix(2)) - Self.mean(recent.prefix(2))) > Self.shift * Self.mean(recent.prefix(2))
        if moved {
            // Measure the new level for one more interval, so that the trial's baseline is two
            // intervals after the move, not one before and one after.
            recent = [rate]
            trialAfterNext = true
            return current
        }
        let reprobe = current == 1 ? Self.reprobeIntervalsWithOne : Self.reprobeIntervalsWithAll
        if lastDecision == 0 || trialAfterNext || intervals - lastDecision >= reprobe {
            trialAfterNext = false
            trialRates = []
            return other
        }
        return current
    }
}

/// Drives a workload on worker threads spread over a cluster's nodes for a fixed duration.
package enum Runner {
    /// Runs `workers` threads issuing `workload`'s transactions for `seconds`.
    ///
    /// With `adaptive`, a ``WorkerCountController`` decides each 250 ms interval whether all the
    /// workers run or one; the others wait between transactions (holding nothing). The report
    /// says how many ran in each interval.
    /// A node to crash (``Cluster/crash(_:)``) `at` seconds into the run; the run then counts
    /// commits per millisecond.
    package struct CrashPlan: Sendable {
        package var node: NodeID
        package var at: Double
        package init(node: NodeID, at: Double) {
            self.node = node
            self.at = at
        }
    }

    /// p50, p90, p99 and p99.9 of `histogram`, in nanoseconds.
    static func percentiles(of histogram: Histogram<UInt64>) -> [String: UInt64] {
        ["p50": histogram.valueAtPercentile(50), "p90": histogram.valueAtPercentile(90),
         "p99": histogram.valueAtPercentile(99), "p99.9": histogram.valueAtPercentile(99.9)]
    }

    package static func run(_ workload: some Workload, on cluster: Cluster, workers: Int, adaptive: Bool = false,
                           seconds: Double, seed: UInt64, crash: CrashPlan? = nil,
                           progress: (@Sendable (String) -> Void)? = nil) -> RunReport {
        let adaptive = adaptive && crash == nil
        let types = workload.transactionTypes
        let stop = Atomic<Bool>(false)
        let perWorker = Mutex<[([Histogram<UInt64>], [Int], [Int], Int64, Int, [Int64])]>([])
        let before = cluster.nodes.map(\.statistics)
        let start = monotonicNanoseconds()
        let deadline = start + UInt64(seconds * 1e9)
        let threadCount = workers
        // Commits so far, one counter per worker on a cache line of its own (a shared counter
        // would pass its line between the workers' cores on every commit); the sampler sums them.
        let committedNow = UnsafeMutableRawPointer.allocate(byteCount: 64 * max(1, workers), alignment: 64)
            .bindMemory(to: Atomic<Int>.self, capacity: 8 * max(1, workers))
        for index in 0..<(8 * max(1, workers)) { (committedNow + index).initialize(to: Atomic<Int>(0)) }
        defer {
            committedNow.deinitialize(count: 8 * max(1, workers))
            UnsafeMutableRawPointer(committedNow).deallocate()
        }
        let box = (workload, cluster)
        // Progress sampler on its own thread.
        let timeline = Mutex<[Double]>([])
        let activeTimeline = Mutex<[Int]>([])
        // Workers with an index at or above this wait (written by the sampler, rarely).
        let active = Atomic<Int>(threadCount)
        let bins = Mutex<[Int]>([])
        let crashed = Mutex<(bin: Int, at: UInt64)?>(nil)
        withoutActuallyEscaping({ (index: Int) -> Void in
            if index == threadCount, let crash {
                // Commits per millisecond, the crash at its time; the 250 ms timeline from them.
                var last = 0
                var quarter = 0
                var counts: [Int] = []
                counts.reserveCapacity(Int(seconds * 1_000) + 16)
                let crashAt = start + UInt64(crash.at * 1e9)
                var next = start + 1_000_000
                while !stop.load(ordering: .relaxed) {
                    let now = monotonicNanoseconds()
                    if now < next {
                        usleep(UInt32(max(1, (next - now) / 1_000)))
                        continue
                    }
                    next += 1_000_000
                    let count = (0..<threadCount).reduce(0) { $0 + (committedNow + 8 * $1).pointee.load(ordering: .relaxed) }
                    counts.append(count - last)
                    last = count
                    if now >= crashAt, crashed.withLock({ $0 }) == nil {
                        cluster.crash(crash.node)
                        crashed.withLock { $0 = (counts.count, monotonicNanoseconds()) }
                    }
                    if counts.count - quarter >= 250 {
                        let rate = Double(counts[quarter...].reduce(0, +)) / (Double(counts.count - quarter) / 1_000)
                        timeline.withLock { $0.append(rate) }
                        activeTimeline.withLock { $0.append(threadCount) }
                        progress?(String(format: "%6.1fs  %10.0f committed/s", Double(now - start) / 1e9, rate))
                        quarter = counts.count
                    }
                    if now >= deadline { break }
                }
                bins.withLock { $0 = counts }
                return
            }
            if index == threadCount {
                var last = 0
                var lastTime = start
                var controller = WorkerCountController(maximum: threadCount)
                while !stop.load(ordering: .relaxed) {
                    usleep(250_000)
                    let now = monotonicNanoseconds()
                    let count = (0..<threadCount).reduce(0) { $0 + (committedNow + 8 * $1).pointee.load(ordering: .relaxed) }
                    let rate = Double(count - last) / (Double(now - lastTime) / 1e9)
                    timeline.withLock { $0.append(rate) }
                    activeTimeline.withLock { $0.append(active.load(ordering: .relaxed)) }
                    if adaptive { active.store(controller.next(rate: rate), ordering: .relaxed) }
                    let attempts = cluster.nodes.map { $0.statistics.committed + $0.statistics.totalAborts }.reduce(0, +)
                        - before.map { $0.committed + $0.totalAborts }.reduce(0, +)
                    let aborts = cluster.nodes.map(\.statistics.totalAborts).reduce(0, +) - before.map(\.totalAborts).reduce(0, +)
                    progress?(String(format: "%6.1fs  %10.0f committed/s  abort rate %5.2f%%",
                                     Double(now - start) / 1e9, rate, attempts > 0 ? 100 * Double(aborts) / Double(attempts) : 0)
                              + (adaptive ? "  workers \(activeTimeline.withLock { $0.last ?? threadCount })" : ""))
                    last = count
                    lastTime = now
                    if now >= deadline { break }
                }
                return
            }
            let (workload, cluster) = box
            let node = cluster.nodes[index % cluster.nodes.count]
            var random = WorkloadRandom(seed: seed &+ UInt64(index) &* 7919)
            // One histogram per transaction type (merged for the overall figures).
            var histograms = types.map { _ in Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three) }
            var counts = [Int](repeating: 0, count: types.count)
            var successes = [Int](repeating: 0, count: types.count)
            var delta: Int64 = 0
            var failed = 0
            var inDoubt: [Int64] = []
            // The node's engine once per worker (each read of `Node.engine` is an atomic load and
            // a retain on a line the node's threads share).
            var engine = node.engine
            var transaction = engine.makeTransaction()
            var iterations = 0
            while true {
                iterations &+= 1
                if index > 0, index >= active.load(ordering: .relaxed) {
                    // Not running this interval: wait between transactions, holding nothing.
                    if monotonicNanoseconds() >= deadline { break }
                    usleep(200)
                    continue
                }
                if iterations & 15 == 0, monotonicNanoseconds() >= deadline { break }
                // This worker's node was crashed: its process would be gone.
                if crash != nil, !engine.isRunning { break }
                let began = monotonicNanoseconds()
                var attempt = 0
                var committed: TransactionOutcome?
                // Each attempt draws its inputs anew from a copy of the generator, so a retry
                // repeats the same transaction (same accounts, same amounts).
                let inputs = random
                while true {
                    attempt += 1
                    var draw = inputs
                    var bodyDelta: Int64?
                    let outcome: Engine.AttemptOutcome<TransactionOutcome>
                    do {
                        outcome = try engine.attempt(transaction) { tx in
                            bodyDelta = nil
                            let result = try workload.runOne(on: node, transaction: tx, random: &draw)
                            bodyDelta = result.delta
                            return result
                        }
                    } catch {
                        // The node (a client) was removed and rejoins as a new incarnation: its
                        // engine stopped under the attempt, which did not commit. Go on with the
                        // new engine once the node has it (up to a second).
                        if crash == nil, case .shutDown? = error as? TransactionError {
                            let waitUntil = monotonicNanoseconds() + 1_000_000_000
                            while node.engine === engine, monotonicNanoseconds() < waitUntil { usleep(1_000) }
                            if node.engine !== engine {
                                engine = node.engine
                                transaction = engine.makeTransaction()
                                attempt -= 1
                                continue
                            }
                        }
                        // A non-retryable error. Its commit may yet take effect if no one could
                        // tell (outcome unknown), or if this node was crashed under it.
                        random = draw
                        let unknown = if case .outcomeUnknown? = error as? TransactionError { true } else { false }
                        if let bodyDelta, unknown || (crash != nil && !engine.isRunning) { inDoubt.append(bodyDelta) }
                        break
                    }
                    random = draw
                    if case .committed(let result) = outcome { committed = result; break }
                    let now = monotonicNanoseconds()
                    if case .aborted(let cause) = outcome, engine.mustWaitForRecovery(after: cause), engine.isRunning, now < deadline {
                        // Recovery runs: wait for it (not past the run's end); the attempt does
                        // not count.
                        _ = engine.waitForUnblockedCommits(timeout: .nanoseconds(deadline - now))
                        attempt -= 1
                        continue
                    }
                    if attempt >= engine.options.maximumAttempts { break }
                    let wait = engine.retryDelay(afterAttempt: attempt)
                    if wait > 1_000 { usleep(UInt32(wait / 1_000)) }
                }
                guard let committed else {
                    failed += 1
                    continue
                }
                histograms[committed.type].record(monotonicNanoseconds() - began)
                counts[committed.type] += 1
                if committed.succeeded { successes[committed.type] += 1 }
                delta &+= committed.delta
                (committedNow + 8 * index).pointee.add(1, ordering: .relaxed)
            }
            perWorker.withLock { $0.append((histograms, counts, successes, delta, failed, inDoubt)) }
        }) { body in
            runWorkerThreads(threadCount + 1, body)
        }
        stop.store(true, ordering: .relaxed)
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        let after = cluster.nodes.map(\.statistics)
        var merged = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var byTypeHistograms = types.map { _ in Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three) }
        var typeCounts = [Int](repeating: 0, count: types.count)
        var typeSuccesses = [Int](repeating: 0, count: types.count)
        var committedDelta: Int64 = 0
        var failed = 0
        var inDoubtDeltas: [Int64] = []
        for (histograms, counts, successes, delta, failures, doubtful) in perWorker.withLock({ $0 }) {
            inDoubtDeltas += doubtful
            for (type, histogram) in histograms.enumerated() {
                merged.add(histogram)
                byTypeHistograms[type].add(histogram)
            }
            for i in counts.indices {
                typeCounts[i] += counts[i]
                typeSuccesses[i] += successes[i]
            }
            committedDelta &+= delta
            failed += failures
        }
        let committed = typeCounts.reduce(0, +)
        var aborts: [String: Int] = [:]
        for cause in AbortCause.allCases {
            let n = zip(after, before).map { ($0.aborts[cause] ?? 0) - ($1.aborts[cause] ?? 0) }.reduce(0, +)
            if n > 0 { aborts[cause.description] = n }
        }
        let abortTotal = aborts.values.reduce(0, +)
        var phases: [String: Double] = [:]
        for phase in Phase.allCases {
            let nanos = zip(after, before).map { ($0.phaseNanoseconds[phase] ?? 0) - ($1.phaseNanoseconds[phase] ?? 0) }.reduce(0, +)
            let runs = zip(after, before).map { ($0.phaseCounts[phase] ?? 0) - ($1.phaseCounts[phase] ?? 0) }.reduce(0, +)
            if runs > 0 { phases[phase.description] = Double(nanos) / Double(runs) }
        }
        var cdf: [[Double]] = []
        if merged.totalCount > 0 {
            let tail = stride(from: 99.1, through: 99.9, by: 0.1).map { ($0 * 10).rounded() / 10 }
                + stride(from: 99.91, through: 99.99, by: 0.01).map { ($0 * 100).rounded() / 100 }
            for percentile in Array(stride(from: 0.0, through: 99.0, by: 1.0)) + tail + [100.0] {
                cdf.append([Double(merged.valueAtPercentile(percentile)), percentile / 100])
            }
        }
        return RunReport(
            seconds: elapsed, committed: committed, committedPerSecond: Double(committed) / elapsed,
            attempts: committed + abortTotal, aborts: aborts,
            abortRate: committed + abortTotal > 0 ? Double(abortTotal) / Double(committed + abortTotal) : 0,
            latencyNanoseconds: Self.percentiles(of: merged),
            byType: types.indices.map {
                RunReport.TypeFigures(name: types[$0], committed: typeCounts[$0], perSecond: Double(typeCounts[$0]) / elapsed,
                                      succeeded: typeSuccesses[$0],
                                      latencyNanoseconds: typeCounts[$0] == 0 ? nil : Self.percentiles(of: byTypeHistograms[$0]))
            },
            phaseMeanNanoseconds: phases, timeline: timeline.withLock { $0 }, latencyCDF: cdf,
            committedDelta: committedDelta, inDoubtDeltas: inDoubtDeltas, failed: failed, workers: threadCount, adaptiveWorkers: adaptive && threadCount > 1,
            activeWorkers: activeTimeline.withLock { $0 },
            millisecondBins: crash == nil ? nil : bins.withLock { $0 },
            crashBin: crashed.withLock { $0?.bin }, crashNanoseconds: crashed.withLock { $0?.at })
    }
}

private final class WorkerStart: @unchecked Sendable {
    // Handed to exactly one thread; `body` outlives the threads (joined before return).
    let index: Int
    let body: (Int) -> Void
    init(index: Int, body: @escaping (Int) -> Void) {
        self.index = index
        self.body = body
    }
}

/// Runs `body(0..<count)` on OS threads and joins them.
func runWorkerThreads(_ count: Int, _ body: @escaping (Int) -> Void) {
    var threads: [pthread_t] = []
    for index in 0..<count {
        let start = Unmanaged.passRetained(WorkerStart(index: index, body: body)).toOpaque()
        var thread = pthread_t()
        precondition(pthread_create(&thread, nil, { raw in
            let start = Unmanaged<WorkerStart>.fromOpaque(raw!).takeRetainedValue()
            start.body(start.index)
            return nil
        }, start) == 0)
        threads.append(thread)
    }
    for thread in threads { pthread_join(thread, nil) }
}
